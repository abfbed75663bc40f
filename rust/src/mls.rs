//! Identity and Group: the Python-facing MLS API over OpenMLS.
//!
//! One `Identity` owns one Ed25519 key, one OpenMLS provider (RustCrypto + our
//! tracked storage) and one encrypted log on disk. Every `Group` object of that
//! identity shares the same state behind a mutex, so two Python handles to the
//! same group can never diverge. Every call runs without the GIL as a transaction
//! (`run_tx`): on success exactly the storage records it changed become one log record;
//! on error or panic they, and the cached groups, are put back as they were.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::types::SignatureScheme;
use openmls_traits::OpenMlsProvider;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::{Error, Kind, Result};
use crate::persist::{Log, Stats};
use crate::tracked_storage::TrackedStorage;

// Stage B (snapshots, rollback, read-only processing, external rejoin): a child module so
// it can use the private state below; its Python methods are separate #[pymethods] blocks.
#[path = "fork.rs"]
pub mod fork;

/// MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519 (0x0001).
pub const DEFAULT_SUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// Domain separation for `Identity.sign`/`verify`, so a challenge signature can
/// never be mistaken for an MLS signature (those use "MLS 1.0 " labels).
const SIGN_CONTEXT: &[u8] = b"qpc-sign-v1\0";
const IDENTITY_KEY: &[u8] = b"qpc/identity/ed25519";
const GROUP_INDEX_PREFIX: &[u8] = b"qpc/group/";
/// Tolerate this many out-of-order messages per sender (store-and-forward reorders).
const OUT_OF_ORDER_TOLERANCE: u32 = 16;
const MAX_FORWARD_DISTANCE: u32 = 1000;

pub struct Provider {
    crypto: RustCrypto,
    storage: TrackedStorage,
}

impl OpenMlsProvider for Provider {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = TrackedStorage;

    fn storage(&self) -> &TrackedStorage {
        &self.storage
    }
    fn crypto(&self) -> &RustCrypto {
        &self.crypto
    }
    fn rand(&self) -> &RustCrypto {
        &self.crypto
    }
}

/// Ed25519 signer holding the expanded key (OpenMLS's basic signer re-derives it per call).
pub struct Ed25519Signer {
    key: SigningKey,
}

impl Signer for Ed25519Signer {
    fn sign(&self, payload: &[u8]) -> std::result::Result<Vec<u8>, SignerError> {
        Ok(self.key.sign(payload).to_bytes().to_vec())
    }
    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

pub fn fingerprint(public_key: &[u8]) -> [u8; 32] {
    Sha256::digest(public_key).into()
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

pub struct State {
    provider: Provider,
    signer: Ed25519Signer,
    credential: CredentialWithKey,
    log: Log,
    /// Loaded groups. OpenMLS keeps each group's state both here and in the storage; an
    /// entry must never be ahead of the storage (see `run_tx`).
    groups: HashMap<Vec<u8>, MlsGroup>,
    /// Groups the running operation got for changing, or created: on rollback their
    /// in-memory `MlsGroup` may hold changes the storage no longer has, so they are dropped
    /// and reloaded from the (restored) storage on next use.
    touched: Vec<Vec<u8>>,
}

type Shared = Arc<Mutex<State>>;

fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder()
        .ciphersuite(DEFAULT_SUITE)
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAX_FORWARD_DISTANCE,
        ))
        .max_past_epochs(0)
        .build()
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            OUT_OF_ORDER_TOLERANCE,
            MAX_FORWARD_DISTANCE,
        ))
        .max_past_epochs(0)
        .build()
}

fn msg_bytes(m: &MlsMessageOut) -> Result<Vec<u8>> {
    m.tls_serialize_detached()
        .map_err(|e| Error::from_dbg(Kind::Mls, "serialize message", e))
}

/// Refuse to send or to commit again while our own commit is pending: a message encrypted
/// now would be for the old epoch, which nobody keeps once the commit is merged, and OpenMLS
/// allows only one pending commit. The caller must first merge it (the node stored the
/// fan-out) or clear it (the send failed).
fn ensure_no_pending_commit(g: &MlsGroup) -> Result<()> {
    if g.pending_commit().is_some() {
        return Err(Error::new(
            Kind::PendingCommit,
            "our own commit is pending: merge_pending_commit() once the node stored it, \
             or clear_pending_commit() if sending it failed",
        ));
    }
    Ok(())
}

fn poisoned() -> Error {
    Error::new(Kind::Storage, "storage lock poisoned")
}

fn index_key(gid: &[u8]) -> Vec<u8> {
    let mut k = GROUP_INDEX_PREFIX.to_vec();
    k.extend_from_slice(gid);
    k
}

fn unknown_group(gid: &[u8]) -> Error {
    Error::new(Kind::UnknownGroup, format!("unknown group {}", hex(gid)))
}

impl State {
    /// A new identity with an empty store in `dir` (refuses to overwrite one).
    pub fn create(dir: &Path, secret: &[u8], durable: bool) -> Result<State> {
        let crypto = RustCrypto::default();
        let seed: Zeroizing<[u8; 32]> = Zeroizing::new(
            crypto
                .random_array()
                .map_err(|_| Error::new(Kind::Storage, "no randomness"))?,
        );
        let key = SigningKey::from_bytes(&seed);
        let storage = TrackedStorage::default();
        let log = {
            let mut m = storage.values.write().map_err(|_| poisoned())?;
            m.insert(IDENTITY_KEY.to_vec(), seed.to_vec());
            m.commit();
            Log::create(dir, secret, durable, &crypto, &m)?
        };
        let public: [u8; 32] = key.verifying_key().to_bytes();
        Ok(State {
            provider: Provider { crypto, storage },
            signer: Ed25519Signer { key },
            credential: credential_for(&public),
            log,
            groups: HashMap::new(),
            touched: Vec::new(),
        })
    }

    /// Reopen an identity; a wrong secret is WrongSecret and changes nothing on disk.
    pub fn open(dir: &Path, secret: &[u8], durable: bool) -> Result<State> {
        let storage = TrackedStorage::default();
        let (log, seed) = {
            let mut m = storage.values.write().map_err(|_| poisoned())?;
            let log = Log::open(dir, secret, durable, &mut m)?;
            let raw = m
                .get(IDENTITY_KEY)
                .ok_or_else(|| Error::new(Kind::Storage, "store holds no identity key"))?;
            if raw.len() != 32 {
                return Err(Error::new(Kind::Storage, "corrupt identity key"));
            }
            let mut seed = Zeroizing::new([0u8; 32]);
            seed.copy_from_slice(raw);
            (log, seed)
        };
        let key = SigningKey::from_bytes(&seed);
        let public: [u8; 32] = key.verifying_key().to_bytes();
        Ok(State {
            provider: Provider {
                crypto: RustCrypto::default(),
                storage,
            },
            signer: Ed25519Signer { key },
            credential: credential_for(&public),
            log,
            groups: HashMap::new(),
            touched: Vec::new(),
        })
    }

    fn storage_put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        let mut m = self
            .provider
            .storage
            .values
            .write()
            .map_err(|_| poisoned())?;
        m.insert(key, value);
        Ok(())
    }

    /// Make the running operation durable: its changed records become one log record.
    /// On Err the log file is unchanged (`Log::commit` is all or nothing).
    fn commit(&mut self) -> Result<()> {
        let m = self
            .provider
            .storage
            .values
            .read()
            .map_err(|_| poisoned())?;
        let changes = m.pending_changes();
        self.log.commit(&self.provider.crypto, &changes, &m)?;
        drop(m);
        self.provider
            .storage
            .values
            .write()
            .map_err(|_| poisoned())?
            .commit();
        self.touched.clear();
        Ok(())
    }

    /// Undo the running operation in memory: storage records back to their prior values,
    /// groups it changed dropped from the cache (reloaded from storage on next use).
    fn rollback(&mut self) {
        self.provider.storage.rollback();
        for gid in self.touched.drain(..) {
            self.groups.remove(&gid);
        }
    }

    /// Load a group into the cache if needed.
    fn ensure_loaded(&mut self, gid: &[u8]) -> Result<()> {
        if !self.groups.contains_key(gid) {
            let loaded = MlsGroup::load(&self.provider.storage, &GroupId::from_slice(gid))
                .map_err(|e| Error::from_dbg(Kind::Storage, "load group", e))?
                .ok_or_else(|| unknown_group(gid))?;
            self.groups.insert(gid.to_vec(), loaded);
        }
        Ok(())
    }

    /// A group for reading only (not marked as touched, so an error keeps it cached).
    fn group_view(&mut self, gid: &[u8]) -> Result<&MlsGroup> {
        self.ensure_loaded(gid)?;
        self.groups.get(gid).ok_or_else(|| unknown_group(gid))
    }

    /// Record that the running operation changes (or created) this group.
    fn touch(&mut self, gid: &[u8]) {
        if !self.touched.iter().any(|t| t == gid) {
            self.touched.push(gid.to_vec());
        }
    }
}

/// Split borrows: the group (loaded on first use, marked as touched) plus provider and
/// signer.
fn group_parts<'a>(
    st: &'a mut State,
    gid: &[u8],
) -> Result<(&'a mut MlsGroup, &'a Provider, &'a Ed25519Signer)> {
    st.ensure_loaded(gid)?;
    st.touch(gid);
    let State {
        provider,
        signer,
        groups,
        ..
    } = st;
    let g = groups.get_mut(gid).ok_or_else(|| unknown_group(gid))?;
    Ok((g, provider, signer))
}

/// Run one operation on the identity state as a transaction.
///
/// Why: an OpenMLS operation writes several storage records one after another (a commit
/// rewrites tree, context, secrets, deletes old keys) and mutates the in-memory `MlsGroup`
/// alongside. If it fails or panics halfway, those writes describe no valid state: flushed
/// to the log they would be on disk for good (the next open would load a group that is
/// half in the new epoch), and kept in memory the next operation would build on them. So
/// only an `Ok` is made durable (`State::commit`: one log record); on `Err` (from `f` or
/// from writing the log) or on a panic inside `f`, `State::rollback` puts every record
/// back to its prior value and drops the changed groups from the cache: what is on disk
/// and in memory is exactly what it was before the call.
///
/// Panics: one inside `f` (deep in the MLS library) is caught and rolled back like an
/// error, so the state stays consistent and usable: the identity lock is not poisoned
/// (the catch happens while it is still held) and the storage lock, if the panic hit
/// while it was held, is unpoisoned by the rollback. Only a panic in the transaction
/// machinery itself (commit/rollback, outside the catch) unwinds through the identity
/// lock and poisons it; the state is then of unknown consistency and every later call
/// refuses with "poisoned ... reopen it" (reopening replays the log, which holds only
/// complete operations).
pub fn run_tx<T>(st: &mut State, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
    debug_assert!(st.touched.is_empty());
    debug_assert!(st
        .provider
        .storage
        .values
        .read()
        .is_ok_and(|m| !m.in_transaction()));
    let r = catch_unwind(AssertUnwindSafe(|| f(st))).unwrap_or_else(|_| {
        Err(Error::new(
            Kind::Mls,
            "internal error in the MLS library (the operation was undone)",
        ))
    });
    let r = r.and_then(|v| st.commit().map(|()| v));
    if r.is_err() {
        st.rollback();
    }
    r
}

/// `run_tx` on the shared identity state, without the GIL.
fn run<T: Send>(
    py: Python<'_>,
    shared: &Shared,
    f: impl FnOnce(&mut State) -> Result<T> + Send,
) -> PyResult<T> {
    py.detach(|| {
        let mut st = shared.lock().map_err(|_| {
            Error::new(
                Kind::Storage,
                "identity state poisoned by an earlier internal error; reopen it",
            )
        })?;
        run_tx(&mut st, f)
    })
    .map_err(PyErr::from)
}

/// What `process` saw: (kind, sender fingerprint, application data, epoch after, removed).
pub type Processed = (&'static str, String, Vec<u8>, u64, bool);

/// The operations behind the Python methods, on an already locked state; each runs inside
/// `run_tx` (so the Rust tests can run them, and fail them, without Python).
impl State {
    pub fn op_key_package(&mut self, last_resort: bool) -> Result<Vec<u8>> {
        // Advertise LastResort so the extension passes KeyPackage validation.
        let caps = Capabilities::builder()
            .extensions(vec![ExtensionType::LastResort])
            .build();
        let mut b = KeyPackage::builder().leaf_node_capabilities(caps);
        if last_resort {
            b = b.mark_as_last_resort();
        }
        let bundle = b
            .build(
                DEFAULT_SUITE,
                &self.provider,
                &self.signer,
                self.credential.clone(),
            )
            .map_err(|e| Error::from_dbg(Kind::Mls, "build KeyPackage", e))?;
        let msg: MlsMessageOut = bundle.key_package().clone().into();
        msg_bytes(&msg)
    }

    pub fn op_create_group(&mut self, gid: Option<Vec<u8>>) -> Result<Vec<u8>> {
        let gid = match gid {
            Some(g) if !g.is_empty() && g.len() <= 255 => g,
            Some(_) => return Err(Error::new(Kind::Argument, "group_id must be 1..255 bytes")),
            None => self
                .provider
                .crypto
                .random_vec(16)
                .map_err(|_| Error::new(Kind::Storage, "no randomness"))?,
        };
        let exists = self.groups.contains_key(&gid)
            || MlsGroup::load(&self.provider.storage, &GroupId::from_slice(&gid))
                .map_err(|e| Error::from_dbg(Kind::Storage, "load group", e))?
                .is_some();
        if exists {
            return Err(Error::new(
                Kind::Argument,
                "a group with this id already exists",
            ));
        }
        self.touch(&gid);
        let g = MlsGroup::new_with_group_id(
            &self.provider,
            &self.signer,
            &create_config(),
            GroupId::from_slice(&gid),
            self.credential.clone(),
        )
        .map_err(|e| Error::from_dbg(Kind::Mls, "create group", e))?;
        self.storage_put(index_key(&gid), Vec::new())?;
        self.groups.insert(gid.clone(), g);
        Ok(gid)
    }

    pub fn op_join(&mut self, welcome: &[u8]) -> Result<Vec<u8>> {
        let msg = MlsMessageIn::tls_deserialize_exact(welcome)
            .map_err(|e| Error::from_dbg(Kind::InvalidMessage, "malformed Welcome", e))?;
        let MlsMessageBodyIn::Welcome(w) = msg.extract() else {
            return Err(Error::new(Kind::InvalidMessage, "message is not a Welcome"));
        };
        let staged = StagedWelcome::new_from_welcome(&self.provider, &join_config(), w, None)
            .map_err(|e| match e {
                WelcomeError::NoMatchingKeyPackage | WelcomeError::JoinerSecretNotFound => {
                    Error::from_dbg(Kind::WelcomeNotForUs, "Welcome is not for us", e)
                }
                WelcomeError::LibraryError(_) | WelcomeError::StorageError(_) => {
                    Error::from_dbg(Kind::Mls, "join", e)
                }
                _ => Error::from_dbg(Kind::InvalidMessage, "invalid Welcome", e),
            })?;
        let gid = staged.group_context().group_id().as_slice().to_vec();
        // Joining writes the group's records (over any stale ones of an earlier membership).
        self.touch(&gid);
        let g = staged
            .into_group(&self.provider)
            .map_err(|e| Error::from_dbg(Kind::InvalidMessage, "join", e))?;
        self.storage_put(index_key(&gid), Vec::new())?;
        self.groups.insert(gid.clone(), g);
        Ok(gid)
    }

    pub fn op_encrypt(&mut self, gid: &[u8], data: &[u8]) -> Result<Vec<u8>> {
        ensure_no_pending_commit(self.group_view(gid)?)?;
        let (g, p, s) = group_parts(self, gid)?;
        let m = g.create_message(p, s, data).map_err(|e| match e {
            CreateMessageError::GroupStateError(_) => {
                Error::from_dbg(Kind::NotAMember, "cannot send in this group", e)
            }
            _ => Error::from_dbg(Kind::Mls, "encrypt", e),
        })?;
        msg_bytes(&m)
    }

    pub fn op_process(&mut self, gid: &[u8], message: &[u8]) -> Result<Processed> {
        // Checks that need no change to the group come first, so a junk or early message
        // costs no reload of the group after the rollback.
        let msg = MlsMessageIn::tls_deserialize_exact(message)
            .map_err(|e| Error::from_dbg(Kind::InvalidMessage, "malformed message", e))?;
        let proto = msg
            .try_into_protocol_message()
            .map_err(|e| Error::from_dbg(Kind::InvalidMessage, "not a group message", e))?;
        if proto.group_id().as_slice() != gid {
            return Err(Error::new(
                Kind::InvalidMessage,
                "message is for another group",
            ));
        }
        let epoch = self.group_view(gid)?.epoch();
        if proto.epoch() != epoch {
            return Err(Error::new(
                Kind::WrongEpoch,
                format!(
                    "message is from epoch {}, group is at epoch {}",
                    proto.epoch().as_u64(),
                    epoch.as_u64()
                ),
            ));
        }
        let (g, p, _) = group_parts(self, gid)?;
        let processed = g.process_message(p, proto).map_err(map_process_err)?;
        let sender = match processed.sender() {
            Sender::Member(idx) => g.member_at(*idx).map(|m| member_fp(&m)).unwrap_or_default(),
            _ => String::new(),
        };
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(a) => Ok((
                "application",
                sender,
                a.into_bytes(),
                g.epoch().as_u64(),
                false,
            )),
            ProcessedMessageContent::ProposalMessage(q) => {
                g.store_pending_proposal(&p.storage, *q)
                    .map_err(|e| Error::from_dbg(Kind::Storage, "queue proposal", e))?;
                Ok(("proposal", sender, Vec::new(), g.epoch().as_u64(), false))
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(q) => {
                g.store_pending_proposal(&p.storage, *q)
                    .map_err(|e| Error::from_dbg(Kind::Storage, "queue proposal", e))?;
                Ok(("proposal", sender, Vec::new(), g.epoch().as_u64(), false))
            }
            ProcessedMessageContent::OwnPendingCommit
            | ProcessedMessageContent::OwnPrivateMessage => Err(Error::new(
                Kind::InvalidMessage,
                "message was sent by ourselves",
            )),
            ProcessedMessageContent::StagedCommitMessage(sc) => {
                let removed = sc.self_removed();
                g.merge_staged_commit(p, *sc)
                    .map_err(|e| Error::from_dbg(Kind::Mls, "merge commit", e))?;
                Ok(("commit", sender, Vec::new(), g.epoch().as_u64(), removed))
            }
        }
    }

    pub fn op_add<B: AsRef<[u8]>>(
        &mut self,
        gid: &[u8],
        key_packages: &[B],
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        if key_packages.is_empty() {
            return Err(Error::new(
                Kind::Argument,
                "add() needs at least one KeyPackage",
            ));
        }
        ensure_no_pending_commit(self.group_view(gid)?)?;
        let kps = key_packages
            .iter()
            .map(|b| parse_key_package(&self.provider.crypto, b.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let (g, p, s) = group_parts(self, gid)?;
        let (commit, welcome, _) = g.add_members(p, s, &kps).map_err(|e| match e {
            AddMembersError::GroupStateError(_) => {
                Error::from_dbg(Kind::NotAMember, "cannot commit in this group", e)
            }
            AddMembersError::CreateCommitError(_) => {
                Error::from_dbg(Kind::InvalidKeyPackage, "add members", e)
            }
            _ => Error::from_dbg(Kind::Mls, "add members", e),
        })?;
        Ok((msg_bytes(&commit)?, msg_bytes(&welcome)?))
    }

    pub fn op_remove(&mut self, gid: &[u8], fingerprints: &[String]) -> Result<Vec<u8>> {
        let g = self.group_view(gid)?;
        ensure_no_pending_commit(g)?;
        let mut leaves = Vec::with_capacity(fingerprints.len());
        for fp in fingerprints {
            let want = unhex(&fp.to_ascii_lowercase()).ok_or_else(|| {
                Error::new(Kind::Argument, format!("not a hex fingerprint: {fp:?}"))
            })?;
            let m = g
                .members()
                .find(|m| fingerprint(m.signature_key.as_slice()).as_slice() == want.as_slice())
                .ok_or_else(|| Error::new(Kind::NotAMember, format!("{fp} is not a member")))?;
            leaves.push(m.index);
        }
        let (g, p, s) = group_parts(self, gid)?;
        let (commit, _, _) = g.remove_members(p, s, &leaves).map_err(|e| match e {
            RemoveMembersError::GroupStateError(_) => {
                Error::from_dbg(Kind::NotAMember, "cannot commit in this group", e)
            }
            _ => Error::from_dbg(Kind::Mls, "remove members", e),
        })?;
        msg_bytes(&commit)
    }

    pub fn op_update(&mut self, gid: &[u8]) -> Result<Vec<u8>> {
        ensure_no_pending_commit(self.group_view(gid)?)?;
        let (g, p, s) = group_parts(self, gid)?;
        let bundle = g
            .self_update(p, s, LeafNodeParameters::default())
            .map_err(|e| match e {
                SelfUpdateError::GroupStateError(_) => {
                    Error::from_dbg(Kind::NotAMember, "cannot commit in this group", e)
                }
                _ => Error::from_dbg(Kind::Mls, "self update", e),
            })?;
        let (commit, _, _) = bundle.into_contents();
        msg_bytes(&commit)
    }

    pub fn op_leave(&mut self, gid: &[u8]) -> Result<Vec<u8>> {
        ensure_no_pending_commit(self.group_view(gid)?)?;
        let (g, p, s) = group_parts(self, gid)?;
        let m = g
            .leave_group(p, s)
            .map_err(|e| Error::from_dbg(Kind::NotAMember, "leave group", e))?;
        msg_bytes(&m)
    }

    pub fn op_commit_pending(&mut self, gid: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        ensure_no_pending_commit(self.group_view(gid)?)?;
        let (g, p, s) = group_parts(self, gid)?;
        let (commit, welcome, _) = g
            .commit_to_pending_proposals(p, s)
            .map_err(|e| Error::from_dbg(Kind::Mls, "commit pending proposals", e))?;
        let w = match welcome {
            Some(w) => Some(msg_bytes(&w)?),
            None => None,
        };
        Ok((msg_bytes(&commit)?, w))
    }

    pub fn op_merge_pending_commit(&mut self, gid: &[u8]) -> Result<()> {
        if self.group_view(gid)?.pending_commit().is_none() {
            return Err(Error::new(
                Kind::NoPendingCommit,
                "no pending commit to merge (never created, cleared, or superseded)",
            ));
        }
        let (g, p, _) = group_parts(self, gid)?;
        g.merge_pending_commit(p).map_err(|e| match e {
            MergePendingCommitError::MlsGroupStateError(_) => {
                Error::from_dbg(Kind::NotAMember, "merge own commit", e)
            }
            _ => Error::from_dbg(Kind::Mls, "merge own commit", e),
        })
    }

    pub fn op_clear_pending_commit(&mut self, gid: &[u8]) -> Result<()> {
        if self.group_view(gid)?.pending_commit().is_none() {
            return Ok(());
        }
        let (g, p, _) = group_parts(self, gid)?;
        g.clear_pending_commit(&p.storage)
            .map_err(|e| Error::from_dbg(Kind::Storage, "clear pending commit", e))
    }
}

fn is_wrong_epoch(e: &ValidationError) -> bool {
    matches!(
        e,
        ValidationError::WrongEpoch | ValidationError::NoPastEpochData
    )
}

fn map_process_err(e: ProcessMessageError<crate::tracked_storage::StoreError>) -> Error {
    match &e {
        ProcessMessageError::ValidationError(v) if is_wrong_epoch(v) => {
            Error::from_dbg(Kind::WrongEpoch, "message from another epoch", e)
        }
        ProcessMessageError::GroupStateError(_) => {
            Error::from_dbg(Kind::NotAMember, "group is not operational for us", e)
        }
        ProcessMessageError::StorageError(_) | ProcessMessageError::LibraryError(_) => {
            Error::from_dbg(Kind::Mls, "process message", e)
        }
        _ => Error::from_dbg(Kind::InvalidMessage, "invalid message", e),
    }
}

fn parse_key_package(crypto: &RustCrypto, bytes: &[u8]) -> Result<KeyPackage> {
    let kp_in = match MlsMessageIn::tls_deserialize_exact(bytes) {
        Ok(m) => match m.extract() {
            MlsMessageBodyIn::KeyPackage(kp) => kp,
            _ => {
                return Err(Error::new(
                    Kind::InvalidKeyPackage,
                    "message is not a KeyPackage",
                ))
            }
        },
        Err(_) => KeyPackageIn::tls_deserialize_exact(bytes)
            .map_err(|e| Error::from_dbg(Kind::InvalidKeyPackage, "malformed KeyPackage", e))?,
    };
    let kp = kp_in
        .validate(crypto, ProtocolVersion::Mls10)
        .map_err(|e| Error::from_dbg(Kind::InvalidKeyPackage, "KeyPackage does not verify", e))?;
    // The address of a member is the hash of its signature key; refuse a KeyPackage
    // whose credential claims a different identity.
    let sig = kp.leaf_node().signature_key().as_slice();
    let cred = BasicCredential::try_from(kp.leaf_node().credential().clone())
        .map_err(|e| Error::from_dbg(Kind::InvalidKeyPackage, "credential is not basic", e))?;
    if cred.identity() != fingerprint(sig).as_slice() {
        return Err(Error::new(
            Kind::InvalidKeyPackage,
            "credential identity is not the SHA-256 of the signature key",
        ));
    }
    Ok(kp)
}

fn member_fp(m: &Member) -> String {
    hex(&fingerprint(m.signature_key.as_slice()))
}

// ---------------------------------------------------------------------------------

/// What `Group.process` saw.
#[pyclass(frozen, module = "qpc_node._core", get_all)]
pub struct Event {
    /// "application", "commit" or "proposal".
    kind: &'static str,
    /// Fingerprint (hex) of the sending member.
    sender: String,
    /// Application plaintext (empty for handshake messages).
    data: Py<PyBytes>,
    /// Group epoch after processing.
    epoch: u64,
    /// True when this commit removed us from the group.
    removed: bool,
}

#[pymethods]
impl Event {
    fn __repr__(&self) -> String {
        format!(
            "Event(kind={:?}, sender={:?}, epoch={}, removed={})",
            self.kind, self.sender, self.epoch, self.removed
        )
    }
}

/// Facts about a KeyPackage, checked without holding any identity.
#[pyclass(frozen, module = "qpc_node._core", get_all)]
pub struct KeyPackageInfo {
    ciphersuite: u16,
    fingerprint: String,
    signature_key: Py<PyBytes>,
    not_before: u64,
    not_after: u64,
    last_resort: bool,
    hash_ref: Py<PyBytes>,
}

#[pyclass(frozen, module = "qpc_node._core")]
pub struct Identity {
    shared: Shared,
    public_key: [u8; 32],
    fingerprint: String,
}

#[pyclass(frozen, module = "qpc_node._core")]
pub struct Group {
    shared: Shared,
    gid: Vec<u8>,
}

fn new_group(shared: &Shared, gid: Vec<u8>) -> Group {
    Group {
        shared: Arc::clone(shared),
        gid,
    }
}

fn credential_for(public: &[u8; 32]) -> CredentialWithKey {
    CredentialWithKey {
        credential: BasicCredential::new(fingerprint(public).to_vec()).into(),
        signature_key: public.to_vec().into(),
    }
}

impl Identity {
    fn from_state(state: State) -> Identity {
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(state.signer.key.verifying_key().as_bytes());
        Identity {
            shared: Arc::new(Mutex::new(state)),
            fingerprint: hex(&fingerprint(&public_key)),
            public_key,
        }
    }
}

#[pymethods]
impl Identity {
    /// Make a new identity and an encrypted store in `state_dir` (refuses to overwrite).
    #[staticmethod]
    #[pyo3(signature = (state_dir, secret, durable = true))]
    fn create(
        py: Python<'_>,
        state_dir: PathBuf,
        secret: &[u8],
        durable: bool,
    ) -> PyResult<Identity> {
        let state = py.detach(|| State::create(&state_dir, secret, durable))?;
        Ok(Identity::from_state(state))
    }

    /// Reopen an identity; a wrong secret raises WrongSecret and changes nothing on disk.
    #[staticmethod]
    #[pyo3(signature = (state_dir, secret, durable = true))]
    fn open(
        py: Python<'_>,
        state_dir: PathBuf,
        secret: &[u8],
        durable: bool,
    ) -> PyResult<Identity> {
        let state = py.detach(|| State::open(&state_dir, secret, durable))?;
        Ok(Identity::from_state(state))
    }

    /// Hex SHA-256 of the Ed25519 public key: the user's address.
    #[getter]
    fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Raw 32-byte Ed25519 public key.
    #[getter]
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.public_key)
    }

    /// Sign `data` (domain-separated with "qpc-sign-v1"); check with `verify`.
    fn sign<'py>(&self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let sig = {
            let st = self
                .shared
                .lock()
                .map_err(|_| Error::new(Kind::Storage, "identity state poisoned"))?;
            let mut msg = Vec::with_capacity(SIGN_CONTEXT.len() + data.len());
            msg.extend_from_slice(SIGN_CONTEXT);
            msg.extend_from_slice(data);
            st.signer.key.sign(&msg).to_bytes()
        };
        Ok(PyBytes::new(py, &sig))
    }

    /// A fresh KeyPackage (MLSMessage framing); its private keys stay in the store.
    #[pyo3(signature = (last_resort = false))]
    fn key_package<'py>(
        &self,
        py: Python<'py>,
        last_resort: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let out = run(py, &self.shared, |st| st.op_key_package(last_resort))?;
        Ok(PyBytes::new(py, &out))
    }

    /// Start a new group with us as its only member.
    #[pyo3(signature = (group_id = None))]
    fn create_group(&self, py: Python<'_>, group_id: Option<&[u8]>) -> PyResult<Group> {
        let gid_in = group_id.map(|g| g.to_vec());
        let gid = run(py, &self.shared, |st| st.op_create_group(gid_in))?;
        Ok(new_group(&self.shared, gid))
    }

    /// Handle on a stored group (UnknownGroup if absent).
    fn group(&self, py: Python<'_>, group_id: &[u8]) -> PyResult<Group> {
        let gid = group_id.to_vec();
        let gid = run(py, &self.shared, |st| {
            st.group_view(&gid)?;
            Ok(gid)
        })?;
        Ok(new_group(&self.shared, gid))
    }

    /// Join a group from a Welcome; WelcomeNotForUs if none of our KeyPackages match.
    fn join(&self, py: Python<'_>, welcome: &[u8]) -> PyResult<Group> {
        let gid = run(py, &self.shared, |st| st.op_join(welcome))?;
        Ok(new_group(&self.shared, gid))
    }

    /// Ids of the groups stored for this identity.
    fn groups<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let ids: Vec<Vec<u8>> = {
            let st = self
                .shared
                .lock()
                .map_err(|_| Error::new(Kind::Storage, "identity state poisoned"))?;
            let m = st
                .provider
                .storage
                .values
                .read()
                .map_err(|_| Error::new(Kind::Storage, "storage lock poisoned"))?;
            let mut ids: Vec<Vec<u8>> = m
                .iter()
                .filter_map(|(k, _)| k.strip_prefix(GROUP_INDEX_PREFIX).map(|g| g.to_vec()))
                .collect();
            ids.sort();
            ids
        };
        Ok(ids.iter().map(|g| PyBytes::new(py, g)).collect())
    }

    /// Counters of the on-disk log: bytes_written, records, compactions, fsyncs, file_size.
    fn storage_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let (s, size): (Stats, u64) = {
            let st = self
                .shared
                .lock()
                .map_err(|_| Error::new(Kind::Storage, "identity state poisoned"))?;
            (st.log.stats, st.log.file_size())
        };
        let d = PyDict::new(py);
        d.set_item("bytes_written", s.bytes_written)?;
        d.set_item("records", s.records)?;
        d.set_item("compactions", s.compactions)?;
        d.set_item("fsyncs", s.fsyncs)?;
        d.set_item("file_size", size)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("Identity(fingerprint={:?})", self.fingerprint)
    }
}

#[pymethods]
impl Group {
    #[getter]
    fn group_id<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.gid)
    }

    #[getter]
    fn epoch(&self, py: Python<'_>) -> PyResult<u64> {
        let gid = &self.gid;
        run(py, &self.shared, |st| {
            Ok(st.group_view(gid)?.epoch().as_u64())
        })
    }

    #[getter]
    fn ciphersuite(&self, py: Python<'_>) -> PyResult<u16> {
        let gid = &self.gid;
        run(py, &self.shared, |st| {
            Ok(st.group_view(gid)?.ciphersuite() as u16)
        })
    }

    /// False once we have been removed from (or left) the group.
    #[getter]
    fn is_active(&self, py: Python<'_>) -> PyResult<bool> {
        let gid = &self.gid;
        run(py, &self.shared, |st| Ok(st.group_view(gid)?.is_active()))
    }

    /// Fingerprints (hex) of the current members, in leaf order.
    fn members(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let gid = &self.gid;
        run(py, &self.shared, |st| {
            Ok(st
                .group_view(gid)?
                .members()
                .map(|m| member_fp(&m))
                .collect())
        })
    }

    /// Encrypt an application message for the group.
    fn encrypt<'py>(&self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let gid = &self.gid;
        let out = run(py, &self.shared, |st| st.op_encrypt(gid, data))?;
        Ok(PyBytes::new(py, &out))
    }

    /// Decrypt/verify one message; merges commits and queues proposals.
    fn process(&self, py: Python<'_>, message: &[u8]) -> PyResult<Event> {
        let gid = &self.gid;
        let (kind, sender, data, epoch, removed) =
            run(py, &self.shared, |st| st.op_process(gid, message))?;
        Ok(Event {
            kind,
            sender,
            data: PyBytes::new(py, &data).unbind(),
            epoch,
            removed,
        })
    }

    /// Add members by KeyPackage; returns (commit, welcome). The commit stays pending (the
    /// epoch does not change) until `merge_pending_commit`; send the Welcome only after that.
    fn add<'py>(
        &self,
        py: Python<'py>,
        key_packages: Vec<PyBackedBytes>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let gid = &self.gid;
        let (c, w) = run(py, &self.shared, |st| st.op_add(gid, &key_packages))?;
        Ok((PyBytes::new(py, &c), PyBytes::new(py, &w)))
    }

    /// Remove members by fingerprint (hex); returns the commit, left pending (see `add`).
    fn remove<'py>(
        &self,
        py: Python<'py>,
        fingerprints: Vec<String>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let gid = &self.gid;
        let out = run(py, &self.shared, |st| st.op_remove(gid, &fingerprints))?;
        Ok(PyBytes::new(py, &out))
    }

    /// Rotate our leaf keys (forward secrecy / post-compromise security); returns the commit,
    /// left pending (see `add`).
    fn update<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let gid = &self.gid;
        let out = run(py, &self.shared, |st| st.op_update(gid))?;
        Ok(PyBytes::new(py, &out))
    }

    /// Propose our own removal; another member must commit it (`commit_pending`).
    fn leave<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let gid = &self.gid;
        let out = run(py, &self.shared, |st| st.op_leave(gid))?;
        Ok(PyBytes::new(py, &out))
    }

    /// Commit every queued proposal (e.g. a member's leave); returns (commit, welcome or None),
    /// the commit left pending (see `add`).
    fn commit_pending<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyBytes>, Option<Bound<'py, PyBytes>>)> {
        let gid = &self.gid;
        let (c, w) = run(py, &self.shared, |st| st.op_commit_pending(gid))?;
        Ok((PyBytes::new(py, &c), w.map(|w| PyBytes::new(py, &w))))
    }

    /// Make our pending commit our state: the epoch advances. Call it once the node has
    /// stored the commit's fan-out, never before (a commit nobody else gets forks the group).
    /// Raises NoPendingCommit when nothing is pending: never created, cleared, or superseded
    /// by another member's commit for the same epoch that `process` merged first (then our
    /// commit is lost and must be made again). An error, not a no-op, so the caller cannot
    /// believe a change happened that did not.
    fn merge_pending_commit(&self, py: Python<'_>) -> PyResult<()> {
        let gid = &self.gid;
        run(py, &self.shared, |st| st.op_merge_pending_commit(gid))
    }

    /// Discard our pending commit (its send failed): the group stays on the current epoch and
    /// usable, as it is for every other member. A no-op when nothing is pending, so a failure
    /// path may always call it.
    fn clear_pending_commit(&self, py: Python<'_>) -> PyResult<()> {
        let gid = &self.gid;
        run(py, &self.shared, |st| st.op_clear_pending_commit(gid))
    }

    /// True while a commit we created awaits `merge_pending_commit`/`clear_pending_commit`.
    fn has_pending_commit(&self, py: Python<'_>) -> PyResult<bool> {
        let gid = &self.gid;
        run(py, &self.shared, |st| {
            Ok(st.group_view(gid)?.pending_commit().is_some())
        })
    }

    /// RFC 9420 exporter: a secret shared by all members of the current epoch.
    fn export_secret<'py>(
        &self,
        py: Python<'py>,
        label: &str,
        context: &[u8],
        length: usize,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let gid = &self.gid;
        let out = run(py, &self.shared, |st| {
            if length == 0 || length > 255 * 32 {
                return Err(Error::new(Kind::Argument, "length must be 1..8160"));
            }
            st.ensure_loaded(gid)?;
            let g = st
                .groups
                .get(gid.as_slice())
                .ok_or_else(|| unknown_group(gid))?;
            g.export_secret(&st.provider.crypto, label, context, length)
                .map_err(|e| Error::from_dbg(Kind::NotAMember, "export secret", e))
        })?;
        Ok(PyBytes::new(py, &out))
    }

    fn __repr__(&self) -> String {
        format!("Group(id={})", hex(&self.gid))
    }
}

/// Check a detached signature made by `Identity.sign`; raises InvalidSignature.
#[pyfunction]
pub fn verify(public_key: &[u8], data: &[u8], signature: &[u8]) -> PyResult<()> {
    let pk: [u8; 32] = public_key
        .try_into()
        .map_err(|_| Error::new(Kind::InvalidSignature, "public key must be 32 bytes"))?;
    let vk = VerifyingKey::from_bytes(&pk)
        .map_err(|_| Error::new(Kind::InvalidSignature, "invalid Ed25519 public key"))?;
    let sig: [u8; 64] = signature
        .try_into()
        .map_err(|_| Error::new(Kind::InvalidSignature, "signature must be 64 bytes"))?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig);
    let mut msg = Vec::with_capacity(SIGN_CONTEXT.len() + data.len());
    msg.extend_from_slice(SIGN_CONTEXT);
    msg.extend_from_slice(data);
    // Strict: refuses small-order keys and R (the fuzzer forged with the zero key).
    vk.verify_strict(&msg, &sig)
        .map_err(|_| Error::new(Kind::InvalidSignature, "signature does not verify").into())
}

/// Hex SHA-256 of a raw public key (the address format used everywhere).
#[pyfunction]
pub fn fingerprint_of(public_key: &[u8]) -> String {
    hex(&fingerprint(public_key))
}

/// Parse and verify a KeyPackage (signatures, lifetime, credential binding).
#[pyfunction]
pub fn inspect_key_package(py: Python<'_>, key_package: &[u8]) -> PyResult<KeyPackageInfo> {
    let crypto = RustCrypto::default();
    let (kp, hash_ref, not_before, not_after) =
        py.detach(|| -> Result<(KeyPackage, Vec<u8>, u64, u64)> {
            catch_unwind(AssertUnwindSafe(|| {
                let kp = parse_key_package(&crypto, key_package)?;
                let r = kp
                    .hash_ref(&crypto)
                    .map_err(|e| Error::from_dbg(Kind::InvalidKeyPackage, "hash KeyPackage", e))?;
                // A validated KeyPackage always carries a lifetime in its leaf.
                let lt = kp.life_time();
                let (nb, na) = (lt.not_before(), lt.not_after());
                Ok((kp, r.as_slice().to_vec(), nb, na))
            }))
            .unwrap_or_else(|_| {
                Err(Error::new(
                    Kind::InvalidKeyPackage,
                    "internal error parsing KeyPackage",
                ))
            })
        })?;
    let leaf = kp.leaf_node();
    let sig = leaf.signature_key().as_slice();
    Ok(KeyPackageInfo {
        ciphersuite: kp.ciphersuite() as u16,
        fingerprint: hex(&fingerprint(sig)),
        signature_key: PyBytes::new(py, sig).unbind(),
        not_before,
        not_after,
        last_resort: kp.last_resort(),
        hash_ref: PyBytes::new(py, &hash_ref).unbind(),
    })
}

/// Ciphersuite id of a verified KeyPackage (nodes check it against an allowlist).
#[pyfunction]
pub fn key_package_ciphersuite(py: Python<'_>, key_package: &[u8]) -> PyResult<u16> {
    Ok(inspect_key_package(py, key_package)?.ciphersuite)
}

/// Fingerprint (hex) of the identity that signed a verified KeyPackage.
#[pyfunction]
pub fn key_package_identity(py: Python<'_>, key_package: &[u8]) -> PyResult<String> {
    Ok(inspect_key_package(py, key_package)?.fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TmpDir;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn new_state(tmp: &TmpDir, name: &str) -> State {
        State::create(&tmp.path().join(name), SECRET, false).expect("create identity")
    }

    /// Every stored record, sorted: the in-memory image of the storage.
    fn records(st: &State) -> Vec<(Vec<u8>, Vec<u8>)> {
        let m = st.provider.storage.values.read().expect("lock");
        let mut v: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort();
        v
    }

    fn store_bytes(tmp: &TmpDir, name: &str) -> Vec<u8> {
        std::fs::read(tmp.path().join(name).join(crate::persist::STORE_FILE)).expect("read store")
    }

    fn epoch(st: &mut State, gid: &[u8]) -> u64 {
        run_tx(st, |st| Ok(st.group_view(gid)?.epoch().as_u64())).expect("epoch")
    }

    fn pending(st: &mut State, gid: &[u8]) -> bool {
        run_tx(st, |st| Ok(st.group_view(gid)?.pending_commit().is_some())).expect("pending")
    }

    /// `creator` makes a group and adds every other member with one merged commit.
    fn group_of(members: &mut [&mut State]) -> Vec<u8> {
        let kps: Vec<Vec<u8>> = members[1..]
            .iter_mut()
            .map(|m| run_tx(m, |st| st.op_key_package(false)).expect("key package"))
            .collect();
        let gid =
            run_tx(members[0], |st| st.op_create_group(Some(b"chat".to_vec()))).expect("group");
        let (_c, welcome) = run_tx(members[0], |st| {
            let out = st.op_add(&gid, &kps)?;
            st.op_merge_pending_commit(&gid)?;
            Ok(out)
        })
        .expect("add");
        for m in members[1..].iter_mut() {
            run_tx(m, |st| st.op_join(&welcome)).expect("join");
        }
        gid
    }

    fn talk(from: &mut State, to: &mut State, gid: &[u8], text: &[u8]) {
        let ct = run_tx(from, |st| st.op_encrypt(gid, text)).expect("encrypt");
        let (kind, _, data, _, _) = run_tx(to, |st| st.op_process(gid, &ct)).expect("process");
        assert_eq!((kind, data.as_slice()), ("application", text));
    }

    /// A failing operation after real OpenMLS writes (commit created and merged, a new
    /// KeyPackage stored) changes nothing: not the records in memory, not the log file,
    /// not the cached group.
    #[test]
    fn rollback_on_error_leaves_memory_and_log_unchanged() {
        let tmp = TmpDir::new("rollback-error");
        let (mut a, mut b, mut c) = (
            new_state(&tmp, "a"),
            new_state(&tmp, "b"),
            new_state(&tmp, "c"),
        );
        let gid = group_of(&mut [&mut a, &mut b]);
        let kp_c = run_tx(&mut c, |st| st.op_key_package(false)).expect("kp");
        let (mem, disk) = (records(&a), store_bytes(&tmp, "a"));

        let r: Result<()> = run_tx(&mut a, |st| {
            st.op_add(&gid, &[&kp_c])?;
            st.op_merge_pending_commit(&gid)?;
            st.op_key_package(false)?;
            Err(Error::new(Kind::Mls, "injected failure"))
        });
        assert_eq!(r.expect_err("must fail").msg, "injected failure");
        assert!(records(&a) == mem, "records in memory changed");
        assert!(store_bytes(&tmp, "a") == disk, "log file changed");
        assert_eq!(epoch(&mut a, &gid), 1);
        assert!(!pending(&mut a, &gid));
        talk(&mut a, &mut b, &gid, b"still epoch 1");
        talk(&mut b, &mut a, &gid, b"and back");
        // What is in memory is what a reopen reads back.
        let mem = records(&a);
        drop(a);
        let a2 = State::open(&tmp.path().join("a"), SECRET, false).expect("reopen");
        assert!(records(&a2) == mem, "disk and memory differ");
    }

    /// A panic inside the operation (deep in OpenMLS, simulated here after real writes, and
    /// while the storage lock is held) is an error; everything is rolled back and the
    /// identity stays usable: nothing is poisoned.
    #[test]
    fn rollback_on_panic_leaves_memory_and_log_unchanged() {
        let tmp = TmpDir::new("rollback-panic");
        let (mut a, mut b) = (new_state(&tmp, "a"), new_state(&tmp, "b"));
        let gid = group_of(&mut [&mut a, &mut b]);
        let ct = run_tx(&mut a, |st| st.op_encrypt(&gid, b"m1")).expect("encrypt");
        let (mem, disk) = (records(&b), store_bytes(&tmp, "b"));

        let r: Result<()> = run_tx(&mut b, |st| {
            st.op_process(&gid, &ct)?; // advances b's ratchet: real writes
            st.op_update(&gid)?;
            panic!("injected panic in the MLS library");
        });
        assert_eq!(r.expect_err("must fail").kind, Kind::Mls);
        assert!(records(&b) == mem, "records in memory changed");
        assert!(store_bytes(&tmp, "b") == disk, "log file changed");

        // A panic while the storage lock is held poisons it; the rollback clears that.
        let r: Result<()> = run_tx(&mut b, |st| {
            let mut m = st.provider.storage.values.write().expect("lock");
            m.insert(b"half-written".to_vec(), b"x".to_vec());
            panic!("injected panic holding the storage lock");
        });
        assert!(r.is_err());
        assert!(!b.provider.storage.values.is_poisoned());
        assert!(records(&b) == mem, "records in memory changed");
        assert!(store_bytes(&tmp, "b") == disk, "log file changed");

        // The message that was being processed is processed normally now.
        let (kind, _, data, _, _) = run_tx(&mut b, |st| st.op_process(&gid, &ct)).expect("process");
        assert_eq!((kind, data.as_slice()), ("application", b"m1".as_slice()));
        assert!(!pending(&mut b, &gid));
        talk(&mut b, &mut a, &gid, b"after the panic");
    }

    /// Processing a commit that includes queued proposals clears them from the store (the
    /// original memory storage deleted them under a wrong key, so they stayed forever).
    #[test]
    fn committed_proposals_leave_the_store() {
        let tmp = TmpDir::new("proposals");
        let (mut a, mut b, mut c) = (
            new_state(&tmp, "a"),
            new_state(&tmp, "b"),
            new_state(&tmp, "c"),
        );
        let gid = group_of(&mut [&mut a, &mut b, &mut c]);
        let queued = |st: &State| {
            records(st)
                .iter()
                .filter(|(k, _)| k.starts_with(b"QueuedProposal"))
                .count()
        };
        let proposal = run_tx(&mut c, |st| st.op_leave(&gid)).expect("leave");
        run_tx(&mut a, |st| st.op_process(&gid, &proposal)).expect("queue on a");
        run_tx(&mut b, |st| st.op_process(&gid, &proposal)).expect("queue on b");
        assert_eq!((queued(&a), queued(&b)), (1, 1));
        let (commit, _) = run_tx(&mut a, |st| {
            let out = st.op_commit_pending(&gid)?;
            st.op_merge_pending_commit(&gid)?;
            Ok(out)
        })
        .expect("commit");
        run_tx(&mut b, |st| st.op_process(&gid, &commit)).expect("process commit");
        assert_eq!((queued(&a), queued(&b)), (0, 0));
        talk(&mut a, &mut b, &gid, b"two of us");
    }
}
