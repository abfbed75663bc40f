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
use openmls::framing::errors::{MessageDecryptionError, SecretTreeError};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::random::OpenMlsRand;
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::storage::StorageProvider as _;
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
/// Per sender and epoch, the newest this-many generations seen decrypt in any order (a
/// message up to RATCHET_OUT_OF_ORDER - 1 behind the newest one): store-and-forward relays
/// deliver a sender's burst in any order (the issue asks for at least 100). Each slot holds one message key until used, so this
/// bounds how many keys of an epoch wait in memory per sender.
pub const RATCHET_OUT_OF_ORDER: u32 = 128;
/// A message at most this many generations ahead of the newest one seen decrypts (the
/// ones skipped are the "1,000 ahead" of the issue: lost or still in flight). Further
/// ahead is refused (`RatchetWindowError`), so a forged generation cannot make us derive
/// millions of keys.
pub const RATCHET_MAX_FORWARD: u32 = 1000;
/// Hard cap on the past epochs whose message secrets a group keeps (OpenMLS
/// `PastEpochDeletionPolicy::MaxEpochs`). Within it the Python group core prunes by
/// age (`Group.prune_past_epochs`): secrets stay while a message of that epoch may still
/// be in flight, and no longer, since each kept epoch is forward secrecy given up.
pub const MAX_PAST_EPOCHS: usize = 32;
/// Private-use GroupContext extension type holding the ordered committer list: the
/// concatenated 32-byte fingerprints, first = the member who commits now.
pub const COMMITTERS_EXTENSION: u16 = 0xF0A1;
/// Most entries a committer list may hold.
pub const MAX_COMMITTERS: usize = 255;

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

/// Capabilities of every leaf we make (KeyPackages and created groups): LastResort so that
/// extension passes KeyPackage validation, the committer list so a GroupContextExtensions
/// proposal carrying it is valid (RFC 9420 12.1.7: every member must support it).
fn leaf_capabilities() -> Capabilities {
    Capabilities::builder()
        .extensions(vec![
            ExtensionType::LastResort,
            ExtensionType::Unknown(COMMITTERS_EXTENSION),
        ])
        .build()
}

fn committers_extension(fps: &[[u8; 32]]) -> Extension {
    Extension::Unknown(COMMITTERS_EXTENSION, UnknownExtension(fps.concat()))
}

/// The committer list of a group context: empty when the extension is absent (groups
/// created before it existed); a malformed one is an InvalidMessage (a member could have
/// committed it).
fn committers_of(exts: &Extensions<GroupContext>) -> Result<Vec<String>> {
    let Some(ext) = exts.unknown(COMMITTERS_EXTENSION) else {
        return Ok(Vec::new());
    };
    let raw = &ext.0;
    if raw.is_empty() || !raw.len().is_multiple_of(32) || raw.len() / 32 > MAX_COMMITTERS {
        return Err(Error::new(
            Kind::InvalidMessage,
            "malformed committer list extension",
        ));
    }
    Ok(raw.chunks(32).map(hex).collect())
}

/// Parse a committer list given by the caller: 1..=MAX_COMMITTERS distinct hex fingerprints.
fn parse_committers(list: &[String]) -> Result<Vec<[u8; 32]>> {
    if list.is_empty() || list.len() > MAX_COMMITTERS {
        return Err(Error::new(
            Kind::Argument,
            format!("committers must list 1..{MAX_COMMITTERS} fingerprints"),
        ));
    }
    let mut out: Vec<[u8; 32]> = Vec::with_capacity(list.len());
    for fp in list {
        let raw: [u8; 32] = unhex(&fp.to_ascii_lowercase())
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| Error::new(Kind::Argument, format!("not a fingerprint: {fp:?}")))?;
        if out.contains(&raw) {
            return Err(Error::new(
                Kind::Argument,
                format!("{fp} is listed twice among the committers"),
            ));
        }
        out.push(raw);
    }
    Ok(out)
}

/// RequiredCapabilities naming the committer list (plus whatever `old` required): a
/// GroupContextExtensions proposal may only carry an extension every member must support
/// (OpenMLS checks it against this list), and new members are then checked for it.
fn required_with_committers(old: Option<&RequiredCapabilitiesExtension>) -> Extension {
    let ours = ExtensionType::Unknown(COMMITTERS_EXTENSION);
    let (mut ext_types, proposals, credentials) = match old {
        Some(r) => (
            r.extension_types().to_vec(),
            r.proposal_types().to_vec(),
            r.credential_types().to_vec(),
        ),
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    if !ext_types.contains(&ours) {
        ext_types.push(ours);
    }
    Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
        &ext_types,
        &proposals,
        &credentials,
    ))
}

/// The group context extensions of `g` with the committer list replaced by `fps`.
fn with_committers(g: &MlsGroup, fps: &[[u8; 32]]) -> Result<Extensions<GroupContext>> {
    let mut exts = g.extensions().clone();
    let bad = |e| Error::from_dbg(Kind::Mls, "committer list extension", e);
    exts.add_or_replace(required_with_committers(exts.required_capabilities()))
        .map_err(bad)?;
    exts.add_or_replace(committers_extension(fps))
        .map_err(bad)?;
    Ok(exts)
}

fn create_config(creator: &[u8; 32]) -> Result<MlsGroupCreateConfig> {
    let exts = Extensions::from_vec(vec![
        required_with_committers(None),
        committers_extension(&[*creator]),
    ])
    .map_err(|e| Error::from_dbg(Kind::Mls, "committer list extension", e))?;
    Ok(MlsGroupCreateConfig::builder()
        .ciphersuite(DEFAULT_SUITE)
        .capabilities(leaf_capabilities())
        .with_group_context_extensions(exts)
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            RATCHET_OUT_OF_ORDER,
            RATCHET_MAX_FORWARD,
        ))
        .max_past_epochs(MAX_PAST_EPOCHS)
        .build())
}

fn join_config() -> MlsGroupJoinConfig {
    MlsGroupJoinConfig::builder()
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(
            RATCHET_OUT_OF_ORDER,
            RATCHET_MAX_FORWARD,
        ))
        .max_past_epochs(MAX_PAST_EPOCHS)
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
    // Groups stored before the wider ratchet window and past-epoch secrets get the
    // current configuration the first time they change (written in this transaction).
    let want = join_config();
    if g.configuration() != &want {
        g.set_configuration(&provider.storage, &want)
            .map_err(|e| Error::from_dbg(Kind::Storage, "upgrade group configuration", e))?;
    }
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

/// `f` on the locked shared identity state, without the GIL.
fn with_state<T: Send>(
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
        f(&mut st)
    })
    .map_err(PyErr::from)
}

/// `run_tx` on the shared identity state, without the GIL.
fn run<T: Send>(
    py: Python<'_>,
    shared: &Shared,
    f: impl FnOnce(&mut State) -> Result<T> + Send,
) -> PyResult<T> {
    with_state(py, shared, |st| run_tx(st, f))
}

/// `sender_leaf` of a message whose sender holds no leaf (an external sender).
pub const NO_LEAF: u32 = u32::MAX;

/// What `process` (or `merge_pending_commit`) saw; becomes the Python `Event`.
#[derive(Debug, Default)]
pub struct Processed {
    /// "application", "commit" or "proposal".
    pub kind: &'static str,
    pub sender: String,
    pub data: Vec<u8>,
    /// Group epoch after processing.
    pub epoch: u64,
    /// This commit removed us.
    pub removed: bool,
    /// Epoch the message was sent in (older than `epoch` for a past-epoch message).
    pub message_epoch: u64,
    /// ProposalRef of a proposal.
    pub proposal_ref: Vec<u8>,
    /// Refs of the proposals a commit applied by reference.
    pub covered: Vec<Vec<u8>>,
    /// Fingerprints a commit added / removed.
    pub added: Vec<String>,
    pub removed_members: Vec<String>,
    pub sender_leaf: u32,
    /// A commit with no Add, Remove, GroupContextExtensions (or other non-Update) proposal.
    pub self_update_only: bool,
    /// Epoch authenticator after a commit.
    pub authenticator: Vec<u8>,
    /// A commit changed the committer list.
    pub committers_changed: bool,
}

/// Fingerprint named by a basic credential (qpc credentials carry SHA-256 of the
/// signature key as their identity); empty for any other credential.
fn credential_fp(c: &Credential) -> String {
    BasicCredential::try_from(c.clone())
        .map(|b| hex(b.identity()))
        .unwrap_or_default()
}

/// The member an external commit brings back, or InvalidMessage when the commit is not
/// a rejoin: qpc takes an external commit only as a resync (docs/groups.md, "Rejoin by
/// external commit"), i.e. its new leaf has the signature key of a leaf the same commit
/// removes, and a credential naming that key. So nobody the group removed (on this
/// branch) and nobody who never was a member can join with a GroupInfo they got hold
/// of; every member of the epoch decides the same from the same tree. `out` must
/// already hold the commit's `removed_members` (from `summarize_commit`).
fn rejoiner_of(sc: &StagedCommit, out: &Processed) -> Result<String> {
    let leaf = sc
        .update_path_leaf_node()
        .ok_or_else(|| Error::new(Kind::InvalidMessage, "an external commit without a path"))?;
    let sig = leaf.signature_key().as_slice();
    let fp = fingerprint(sig);
    let named = BasicCredential::try_from(leaf.credential().clone())
        .map(|c| c.identity() == fp.as_slice())
        .unwrap_or(false);
    let fp = hex(&fp);
    if !named {
        return Err(Error::new(
            Kind::InvalidMessage,
            "external commit: the credential does not name the joiner's signature key",
        ));
    }
    if !out.removed_members.contains(&fp) {
        return Err(Error::new(
            Kind::InvalidMessage,
            "external commit by a non-member: only a member of this epoch may rejoin (its old leaf must go)",
        ));
    }
    Ok(fp)
}

/// Fill the commit facts of `out` from a staged commit, before it is merged (removed
/// members are looked up in the tree it is about to change). A committer list the commit
/// sets that does not parse refuses the commit (nothing merged).
fn summarize_commit(g: &MlsGroup, sc: &StagedCommit, out: &mut Processed) -> Result<()> {
    let mut only_updates = true;
    for q in sc.queued_proposals() {
        if matches!(q.proposal_or_ref_type(), ProposalOrRefType::Reference) {
            out.covered
                .push(q.proposal_reference_ref().as_slice().to_vec());
        }
        if !matches!(q.proposal(), Proposal::Update(_)) {
            only_updates = false;
        }
    }
    out.self_update_only = only_updates;
    out.added = sc
        .add_proposals()
        .map(|a| {
            let sig = a.add_proposal().key_package().leaf_node().signature_key();
            hex(&fingerprint(sig.as_slice()))
        })
        .collect();
    out.removed_members = sc
        .remove_proposals()
        .filter_map(|r| g.member_at(r.remove_proposal().removed()))
        .map(|m| member_fp(&m))
        .collect();
    out.removed = sc.self_removed();
    let before = committers_of(g.extensions())?;
    let after = committers_of(sc.group_context().extensions())?;
    out.committers_changed = before != after;
    Ok(())
}

/// The operations behind the Python methods, on an already locked state; each runs inside
/// `run_tx` (so the Rust tests can run them, and fail them, without Python).
impl State {
    pub fn op_key_package(&mut self, last_resort: bool) -> Result<Vec<u8>> {
        // Advertise LastResort so the extension passes KeyPackage validation.
        let mut b = KeyPackage::builder().leaf_node_capabilities(leaf_capabilities());
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
            &create_config(&fingerprint(self.signer.key.verifying_key().as_bytes()))?,
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
        let welcome_err = |e: WelcomeError<_>| match e {
            WelcomeError::NoMatchingKeyPackage | WelcomeError::JoinerSecretNotFound => {
                Error::from_dbg(Kind::WelcomeNotForUs, "Welcome is not for us", e)
            }
            WelcomeError::LibraryError(_) | WelcomeError::StorageError(_) => {
                Error::from_dbg(Kind::Mls, "join", e)
            }
            _ => Error::from_dbg(Kind::InvalidMessage, "invalid Welcome", e),
        };
        let processed = ProcessedWelcome::new_from_welcome(&self.provider, &join_config(), w)
            .map_err(welcome_err)?;
        // A Welcome into a group we still hold: we were added on a branch that lost a fork
        // and are added again on the winner (docs/groups.md). Its state replaces ours, as
        // for a stale earlier membership; a Welcome that fails leaves ours (one transaction).
        let old = processed
            .unverified_group_info()
            .group_id()
            .as_slice()
            .to_vec();
        if self.group_view(&old).is_ok() {
            self.drop_group_records(&old)?;
        }
        let staged = processed
            .into_staged_welcome(&self.provider, None)
            .map_err(welcome_err)?;
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
        // OpenMLS refuses to send while proposals are queued. On a mesh the commit that
        // covers them may be minutes away (or never come: they are re-proposed), and an
        // application message does not depend on them, so they are set aside for the
        // message and queued again (the whole call is one transaction: all or nothing).
        let queued: Vec<QueuedProposal> = g.pending_proposals().cloned().collect();
        if !queued.is_empty() {
            g.clear_pending_proposals(p.storage())
                .map_err(|e| Error::from_dbg(Kind::Storage, "set proposals aside", e))?;
        }
        let m = g.create_message(p, s, data).map_err(|e| match e {
            CreateMessageError::GroupStateError(_) => {
                Error::from_dbg(Kind::NotAMember, "cannot send in this group", e)
            }
            _ => Error::from_dbg(Kind::Mls, "encrypt", e),
        })?;
        for q in queued {
            g.store_pending_proposal(p.storage(), q)
                .map_err(|e| Error::from_dbg(Kind::Storage, "queue proposals again", e))?;
        }
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
        // A future epoch needs commits we have not seen: the caller holds the message and
        // retries. A past one may still decrypt from the kept past-epoch secrets (OpenMLS
        // refuses handshake messages from past epochs, and answers NoPastEpochData once
        // that epoch's secrets are gone: both WrongEpoch).
        if proto.epoch() > epoch {
            return Err(Error::new(
                Kind::WrongEpoch,
                format!(
                    "message is from epoch {}, group is at epoch {}",
                    proto.epoch().as_u64(),
                    epoch.as_u64()
                ),
            ));
        }
        let message_epoch = proto.epoch().as_u64();
        let (g, p, _) = group_parts(self, gid)?;
        let processed = match g.process_message(p, proto) {
            Ok(processed) => processed,
            Err(e) => {
                let err = map_process_err(e);
                // OpenMLS reports a past epoch whose secrets are gone as a generation "too
                // distant in the past": it is the epoch that is out of reach.
                if err.kind == Kind::OutOfWindow
                    && message_epoch < epoch.as_u64()
                    && !self.op_past_epochs(gid)?.contains(&message_epoch)
                {
                    return Err(Error::new(
                        Kind::WrongEpoch,
                        format!("the secrets of epoch {message_epoch} are deleted"),
                    ));
                }
                return Err(err);
            }
        };
        let (sender, sender_leaf) = match processed.sender() {
            Sender::Member(idx) => {
                // The leaf may hold someone else by now (a past-epoch message whose sender
                // was removed): then the credential the message was verified with names
                // the sender (its identity is the fingerprint, as for every qpc member).
                let fp = match g.member_at(*idx) {
                    Some(m) if &m.credential == processed.credential() => member_fp(&m),
                    _ => credential_fp(processed.credential()),
                };
                (fp, idx.u32())
            }
            _ => (credential_fp(processed.credential()), NO_LEAF),
        };
        let mut out = Processed {
            sender,
            sender_leaf,
            message_epoch,
            ..Processed::default()
        };
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(a) => {
                out.kind = "application";
                out.data = a.into_bytes();
            }
            ProcessedMessageContent::ProposalMessage(q) => {
                out.kind = "proposal";
                out.proposal_ref = q.proposal_reference_ref().as_slice().to_vec();
                g.store_pending_proposal(&p.storage, *q)
                    .map_err(|e| Error::from_dbg(Kind::Storage, "queue proposal", e))?;
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(q) => {
                out.kind = "proposal";
                out.proposal_ref = q.proposal_reference_ref().as_slice().to_vec();
                g.store_pending_proposal(&p.storage, *q)
                    .map_err(|e| Error::from_dbg(Kind::Storage, "queue proposal", e))?;
            }
            ProcessedMessageContent::OwnPendingCommit
            | ProcessedMessageContent::OwnPrivateMessage => {
                return Err(Error::new(
                    Kind::InvalidMessage,
                    "message was sent by ourselves",
                ))
            }
            ProcessedMessageContent::StagedCommitMessage(sc) => {
                out.kind = "commit";
                summarize_commit(g, &sc, &mut out)?;
                // --- fork (mlsb): an external commit (rejoin) adds its sender through its
                // path, with no Add proposal: report it as added all the same, once it
                // passed the rejoin rule (nothing is merged when it does not).
                if out.sender_leaf == NO_LEAF {
                    out.sender = rejoiner_of(&sc, &out)?;
                    out.added.push(out.sender.clone());
                }
                g.merge_staged_commit(p, *sc)
                    .map_err(|e| Error::from_dbg(Kind::Mls, "merge commit", e))?;
                out.authenticator = g.epoch_authenticator().as_slice().to_vec();
            }
        }
        out.epoch = g.epoch().as_u64();
        Ok(out)
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
        let (c, w) = self.op_commit(gid, key_packages, &[], None)?;
        let w = w.ok_or_else(|| Error::new(Kind::Mls, "a commit that adds made no Welcome"))?;
        Ok((c, w))
    }

    pub fn op_remove(&mut self, gid: &[u8], fingerprints: &[String]) -> Result<Vec<u8>> {
        if fingerprints.is_empty() {
            return Err(Error::new(
                Kind::Argument,
                "remove() needs at least one fingerprint",
            ));
        }
        Ok(self.op_commit::<&[u8]>(gid, &[], fingerprints, None)?.0)
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

    /// Commit every stored proposal (by reference), plus inline Adds/Removes and, when
    /// `committers` is given, a GroupContextExtensions proposal setting the committer list.
    /// Returns (commit, Welcome if anyone is added); the commit is left pending.
    pub fn op_commit<B: AsRef<[u8]>>(
        &mut self,
        gid: &[u8],
        key_packages: &[B],
        remove: &[String],
        committers: Option<&[String]>,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        let g = self.group_view(gid)?;
        ensure_no_pending_commit(g)?;
        if !g.is_active() {
            return Err(Error::new(Kind::NotAMember, "cannot commit in this group"));
        }
        let leaves = leaves_of(g, remove)?;
        let exts = match committers {
            Some(c) => Some(with_committers(g, &parse_committers(c)?)?),
            None => None,
        };
        let kps = key_packages
            .iter()
            .map(|b| parse_key_package(&self.provider.crypto, b.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let adding = !kps.is_empty();
        let (g, p, s) = group_parts(self, gid)?;
        // A member cannot commit its own removal (RFC 9420 12.4: CannotRemoveSelf): such a
        // proposal (its own leave, or someone's request to remove it) stays for another
        // committer, instead of making every commit of this member fail.
        let own_leaf = g.own_leaf_index();
        let mut b = g
            .commit_builder()
            .consume_proposal_store(true)
            .propose_adds(kps)
            .propose_removals(leaves);
        if let Some(exts) = exts {
            b = b
                .propose_group_context_extensions(exts)
                .map_err(|e| Error::from_dbg(Kind::Mls, "committer list proposal", e))?;
        }
        let bundle = b
            .load_psks(p.storage())
            .map_err(|e| Error::from_dbg(Kind::Mls, "commit", e))?
            .build(p.rand(), p.crypto(), s, |q| !removes_leaf(q, own_leaf))
            .map_err(|e| {
                // An Add whose KeyPackage the group cannot take (e.g. it lacks a capability
                // the group context needs) fails here.
                let kind = if adding {
                    Kind::InvalidKeyPackage
                } else {
                    Kind::Mls
                };
                Error::from_dbg(kind, "build commit", e)
            })?
            .stage_commit(p)
            .map_err(|e| Error::from_dbg(Kind::Mls, "stage commit", e))?;
        let (commit, welcome, _) = bundle.into_messages();
        let w = match welcome {
            Some(w) => Some(msg_bytes(&w)?),
            None => None,
        };
        Ok((msg_bytes(&commit)?, w))
    }

    pub fn op_commit_pending(&mut self, gid: &[u8]) -> Result<(Vec<u8>, Option<Vec<u8>>)> {
        self.op_commit::<&[u8]>(gid, &[], &[], None)
    }

    /// Run one proposal-making call and return (message, ref of the proposal it queued in
    /// our own store). Refs are found as the store's difference, so calls that do not
    /// return theirs (leave) work the same. `same` recognises the proposal the call makes:
    /// a request proposed again (re-issued after a restart while its first proposal,
    /// never sent, stayed in our store) signs the same content (Ed25519 is deterministic)
    /// and gets the same ref, which OpenMLS would queue twice in memory; so our queued
    /// proposal that `same` matches is taken out first and the call queues it afresh.
    fn propose(
        &mut self,
        gid: &[u8],
        same: impl Fn(&Proposal) -> bool,
        f: impl FnOnce(&mut MlsGroup, &Provider, &Ed25519Signer) -> Result<MlsMessageOut>,
    ) -> Result<(Vec<u8>, Vec<u8>)> {
        let g = self.group_view(gid)?;
        ensure_no_pending_commit(g)?;
        if !g.is_active() {
            return Err(Error::new(Kind::NotAMember, "cannot propose in this group"));
        }
        let me = g.own_leaf_index();
        let again: Vec<_> = g
            .pending_proposals()
            .filter(|q| matches!(q.sender(), Sender::Member(l) if *l == me))
            .filter(|q| same(q.proposal()))
            .map(|q| q.proposal_reference_ref().clone())
            .collect();
        let (g, p, s) = group_parts(self, gid)?;
        for r in &again {
            g.remove_pending_proposal(&p.storage, r)
                .map_err(|e| Error::from_dbg(Kind::Storage, "drop a proposal made again", e))?;
        }
        let before = proposal_refs(g);
        let msg = f(g, p, s)?;
        let new: Vec<Vec<u8>> = proposal_refs(g)
            .into_iter()
            .filter(|r| !before.contains(r))
            .collect();
        let [r] = <[Vec<u8>; 1]>::try_from(new)
            .map_err(|_| Error::new(Kind::Mls, "proposal was not queued in our own store"))?;
        Ok((msg_bytes(&msg)?, r))
    }

    pub fn op_propose_add(&mut self, gid: &[u8], key_package: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        let kp = parse_key_package(&self.provider.crypto, key_package)?;
        let kp_bytes = kp
            .tls_serialize_detached()
            .map_err(|e| Error::from_dbg(Kind::InvalidKeyPackage, "encode key package", e))?;
        let same = |q: &Proposal| match q {
            Proposal::Add(a) => {
                a.key_package().tls_serialize_detached().ok() == Some(kp_bytes.clone())
            }
            _ => false,
        };
        self.propose(gid, same, |g, p, s| {
            g.propose_add_member(p, s, &kp)
                .map(|(m, _)| m)
                .map_err(|e| Error::from_dbg(Kind::InvalidKeyPackage, "propose add", e))
        })
    }

    pub fn op_propose_remove(&mut self, gid: &[u8], fp: &str) -> Result<(Vec<u8>, Vec<u8>)> {
        let [leaf] =
            <[LeafNodeIndex; 1]>::try_from(leaves_of(self.group_view(gid)?, &[fp.to_string()])?)
                .map_err(|_| Error::new(Kind::Argument, "one fingerprint"))?;
        let same = |q: &Proposal| matches!(q, Proposal::Remove(r) if r.removed() == leaf);
        self.propose(gid, same, |g, p, s| {
            if leaf == g.own_leaf_index() {
                return Err(Error::new(
                    Kind::Argument,
                    "use propose_leave() to remove ourselves",
                ));
            }
            g.propose_remove_member(p, s, leaf)
                .map(|(m, _)| m)
                .map_err(|e| Error::from_dbg(Kind::Mls, "propose remove", e))
        })
    }

    pub fn op_propose_update(&mut self, gid: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        // A self-update carries a fresh HPKE key: never the same as one queued before.
        self.propose(
            gid,
            |_| false,
            |g, p, s| {
                g.propose_self_update(p, s, LeafNodeParameters::default())
                    .map(|(m, _)| m)
                    .map_err(|e| Error::from_dbg(Kind::Mls, "propose update", e))
            },
        )
    }

    pub fn op_propose_leave(&mut self, gid: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        let own = self.group_view(gid)?.own_leaf_index();
        let same = move |q: &Proposal| matches!(q, Proposal::Remove(r) if r.removed() == own);
        self.propose(gid, same, |g, p, s| {
            g.leave_group(p, s)
                .map_err(|e| Error::from_dbg(Kind::NotAMember, "leave group", e))
        })
    }

    pub fn op_clear_proposals(&mut self, gid: &[u8]) -> Result<()> {
        let (g, p, _) = group_parts(self, gid)?;
        g.clear_pending_proposals(&p.storage)
            .map_err(|e| Error::from_dbg(Kind::Storage, "clear proposals", e))
    }

    /// Epochs whose message secrets are kept (oldest first), read from the stored store.
    pub fn op_past_epochs(&mut self, gid: &[u8]) -> Result<Vec<u64>> {
        self.group_view(gid)?;
        let view: Option<PastEpochsView> = self
            .provider
            .storage
            .message_secrets(&GroupId::from_slice(gid))
            .map_err(|e| Error::from_dbg(Kind::Storage, "read message secrets", e))?;
        match view {
            Some(v) => v.epochs(),
            None => Ok(Vec::new()),
        }
    }

    /// Delete the message secrets of all but the newest `keep` past epochs; how many went.
    pub fn op_prune_past_epochs(&mut self, gid: &[u8], keep: usize) -> Result<usize> {
        let before = self.op_past_epochs(gid)?.len();
        if before <= keep {
            return Ok(0);
        }
        let (g, p, _) = group_parts(self, gid)?;
        // "Older than forever" deletes nothing by age; the count cap does the work.
        let policy =
            PastEpochDeletion::older_than_duration(std::time::Duration::MAX).max_past_epochs(keep);
        g.delete_past_epoch_secrets(p, policy)
            .map_err(|e| Error::from_dbg(Kind::Storage, "delete past epoch secrets", e))?;
        Ok(before - self.op_past_epochs(gid)?.len())
    }

    pub fn op_merge_pending_commit(&mut self, gid: &[u8]) -> Result<Processed> {
        let own_fp = hex(&fingerprint(self.signer.key.verifying_key().as_bytes()));
        let (g, p, _) = group_parts(self, gid)?;
        let mut out = Processed {
            kind: "commit",
            sender: own_fp,
            sender_leaf: g.own_leaf_index().u32(),
            message_epoch: g.epoch().as_u64(),
            ..Processed::default()
        };
        let Some(sc) = g.pending_commit() else {
            return Err(Error::new(
                Kind::NoPendingCommit,
                "no pending commit to merge (never created, cleared, or superseded)",
            ));
        };
        summarize_commit(g, sc, &mut out)?;
        g.merge_pending_commit(p).map_err(|e| match e {
            MergePendingCommitError::MlsGroupStateError(_) => {
                Error::from_dbg(Kind::NotAMember, "merge own commit", e)
            }
            _ => Error::from_dbg(Kind::Mls, "merge own commit", e),
        })?;
        out.epoch = g.epoch().as_u64();
        out.authenticator = g.epoch_authenticator().as_slice().to_vec();
        Ok(out)
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
        ProcessMessageError::ValidationError(ValidationError::UnableToDecrypt(
            MessageDecryptionError::SecretTreeError(t),
        )) => match t {
            // The key of this generation was used (and deleted): we decrypted it before.
            SecretTreeError::SecretReuseError => {
                Error::from_dbg(Kind::Duplicate, "message already processed", e)
            }
            SecretTreeError::TooDistantInThePast | SecretTreeError::TooDistantInTheFuture => {
                Error::from_dbg(Kind::OutOfWindow, "outside the sender ratchet window", e)
            }
            _ => Error::from_dbg(Kind::InvalidMessage, "invalid message", e),
        },
        ProcessMessageError::GroupStateError(_) => {
            Error::from_dbg(Kind::NotAMember, "group is not operational for us", e)
        }
        // gwire: relays reorder; the proposal may still come (the caller holds the commit).
        ProcessMessageError::InvalidCommit(StageCommitError::MissingProposal) => Error::from_dbg(
            Kind::MissingProposal,
            "commit names a proposal not received",
            e,
        ),
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

/// Leaf indices of members named by hex fingerprint (NotAMember for an unknown one).
fn leaves_of(g: &MlsGroup, fingerprints: &[String]) -> Result<Vec<LeafNodeIndex>> {
    let mut leaves = Vec::with_capacity(fingerprints.len());
    for fp in fingerprints {
        let want = unhex(&fp.to_ascii_lowercase())
            .ok_or_else(|| Error::new(Kind::Argument, format!("not a hex fingerprint: {fp:?}")))?;
        let m = g
            .members()
            .find(|m| fingerprint(m.signature_key.as_slice()).as_slice() == want.as_slice())
            .ok_or_else(|| Error::new(Kind::NotAMember, format!("{fp} is not a member")))?;
        leaves.push(m.index);
    }
    Ok(leaves)
}

/// True for a Remove proposal of `leaf`.
fn removes_leaf(q: &QueuedProposal, leaf: LeafNodeIndex) -> bool {
    matches!(q.proposal(), Proposal::Remove(r) if r.removed() == leaf)
}

/// Refs of the proposals in the group's proposal store.
fn proposal_refs(g: &MlsGroup) -> Vec<Vec<u8>> {
    g.pending_proposals()
        .map(|q| q.proposal_reference_ref().as_slice().to_vec())
        .collect()
}

/// Only the epochs of OpenMLS's stored `MessageSecretsStore` (its JSON in our storage):
/// OpenMLS has no accessor for which past epochs it keeps, and the count alone cannot
/// tell the Python core which epochs still decrypt.
struct PastEpochsView(serde_json::Value);

impl PastEpochsView {
    fn epochs(&self) -> Result<Vec<u64>> {
        let bad = || Error::new(Kind::Storage, "unexpected past-epoch secrets layout");
        let trees = self
            .0
            .get("past_epoch_trees")
            .and_then(|t| t.as_array())
            .ok_or_else(bad)?;
        trees
            .iter()
            .map(|t| t.get("epoch").and_then(|e| e.as_u64()).ok_or_else(bad))
            .collect()
    }
}

impl serde::Serialize for PastEpochsView {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> serde::Deserialize<'de> for PastEpochsView {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        serde_json::Value::deserialize(d).map(PastEpochsView)
    }
}

impl openmls_traits::storage::Entity<{ openmls_traits::storage::CURRENT_VERSION }>
    for PastEpochsView
{
}
impl openmls_traits::storage::traits::MessageSecrets<{ openmls_traits::storage::CURRENT_VERSION }>
    for PastEpochsView
{
}

// ---------------------------------------------------------------------------------

/// What `Group.process` (or `merge_pending_commit`) saw.
#[pyclass(frozen, module = "qpc_node._core")]
pub struct Event {
    /// "application", "commit" or "proposal".
    #[pyo3(get)]
    kind: &'static str,
    /// Fingerprint (hex) of the sending member.
    #[pyo3(get)]
    sender: String,
    /// Application plaintext (empty for handshake messages).
    #[pyo3(get)]
    data: Py<PyBytes>,
    /// Group epoch after processing.
    #[pyo3(get)]
    epoch: u64,
    /// True when this commit removed us from the group.
    #[pyo3(get)]
    removed: bool,
    #[pyo3(get)]
    message_epoch: u64,
    #[pyo3(get)]
    proposal_ref: Py<PyBytes>,
    covered: Vec<Vec<u8>>,
    #[pyo3(get)]
    added: Vec<String>,
    #[pyo3(get)]
    removed_members: Vec<String>,
    #[pyo3(get)]
    sender_leaf: u32,
    #[pyo3(get)]
    self_update_only: bool,
    #[pyo3(get)]
    authenticator: Py<PyBytes>,
    #[pyo3(get)]
    committers_changed: bool,
}

impl Event {
    fn new(py: Python<'_>, p: Processed) -> Event {
        Event {
            kind: p.kind,
            sender: p.sender,
            data: PyBytes::new(py, &p.data).unbind(),
            epoch: p.epoch,
            removed: p.removed,
            message_epoch: p.message_epoch,
            proposal_ref: PyBytes::new(py, &p.proposal_ref).unbind(),
            covered: p.covered,
            added: p.added,
            removed_members: p.removed_members,
            sender_leaf: p.sender_leaf,
            self_update_only: p.self_update_only,
            authenticator: PyBytes::new(py, &p.authenticator).unbind(),
            committers_changed: p.committers_changed,
        }
    }
}

#[pymethods]
impl Event {
    /// Refs of the proposals a commit applied by reference (inline ones excluded).
    #[getter]
    fn covered<'py>(&self, py: Python<'py>) -> Vec<Bound<'py, PyBytes>> {
        self.covered.iter().map(|r| PyBytes::new(py, r)).collect()
    }

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
        let p = run(py, &self.shared, |st| st.op_process(gid, message))?;
        Ok(Event::new(py, p))
    }

    /// Add members by KeyPackage; returns (commit, welcome). The commit stays pending (the
    /// epoch does not change) until `merge_pending_commit`; send the Welcome only after that.
    /// With `committers`, the same commit also sets the committer list.
    #[pyo3(signature = (key_packages, committers = None))]
    fn add<'py>(
        &self,
        py: Python<'py>,
        key_packages: Vec<PyBackedBytes>,
        committers: Option<Vec<String>>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let gid = &self.gid;
        let (c, w) = run(py, &self.shared, |st| match &committers {
            None => st.op_add(gid, &key_packages),
            Some(list) => {
                if key_packages.is_empty() {
                    return Err(Error::new(
                        Kind::Argument,
                        "add() needs at least one KeyPackage",
                    ));
                }
                let (c, w) = st.op_commit(gid, &key_packages, &[], Some(list))?;
                let w = w.ok_or_else(|| Error::new(Kind::Mls, "no Welcome for an add"))?;
                Ok((c, w))
            }
        })?;
        Ok((PyBytes::new(py, &c), PyBytes::new(py, &w)))
    }

    /// Remove members by fingerprint (hex); returns the commit, left pending (see `add`).
    /// With `committers`, the same commit also sets the committer list.
    #[pyo3(signature = (fingerprints, committers = None))]
    fn remove<'py>(
        &self,
        py: Python<'py>,
        fingerprints: Vec<String>,
        committers: Option<Vec<String>>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let gid = &self.gid;
        let out = run(py, &self.shared, |st| match &committers {
            None => st.op_remove(gid, &fingerprints),
            Some(list) => {
                if fingerprints.is_empty() {
                    return Err(Error::new(
                        Kind::Argument,
                        "remove() needs at least one fingerprint",
                    ));
                }
                Ok(st
                    .op_commit::<&[u8]>(gid, &[], &fingerprints, Some(list))?
                    .0)
            }
        })?;
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

    /// Commit every queued proposal, by reference (members' adds, removes, updates,
    /// leaves); returns (commit, welcome or None), the commit left pending (see `add`).
    /// Two kinds stay uncovered: our own Update proposals (the commit's path renews our
    /// leaf instead, RFC 9420 12.2) and any Remove of ourselves (another member must
    /// commit it).
    /// With `committers`, the commit also sets the committer list (an inline
    /// GroupContextExtensions proposal).
    #[pyo3(signature = (committers = None))]
    fn commit_pending<'py>(
        &self,
        py: Python<'py>,
        committers: Option<Vec<String>>,
    ) -> PyResult<(Bound<'py, PyBytes>, Option<Bound<'py, PyBytes>>)> {
        let gid = &self.gid;
        let (c, w) = run(py, &self.shared, |st| match committers.as_deref() {
            None => st.op_commit_pending(gid),
            Some(list) => st.op_commit::<&[u8]>(gid, &[], &[], Some(list)),
        })?;
        Ok((PyBytes::new(py, &c), w.map(|w| PyBytes::new(py, &w))))
    }

    /// Propose adding the owner of a KeyPackage; returns (proposal message, ProposalRef).
    /// Any member may; the proposal is also queued in our own store, so our own next
    /// commit covers it too.
    fn propose_add<'py>(
        &self,
        py: Python<'py>,
        key_package: &[u8],
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let gid = &self.gid;
        let (m, r) = run(py, &self.shared, |st| st.op_propose_add(gid, key_package))?;
        Ok((PyBytes::new(py, &m), PyBytes::new(py, &r)))
    }

    /// Propose removing a member (by fingerprint); returns (proposal, ProposalRef).
    fn propose_remove<'py>(
        &self,
        py: Python<'py>,
        fingerprint: &str,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let gid = &self.gid;
        let (m, r) = run(py, &self.shared, |st| {
            st.op_propose_remove(gid, fingerprint)
        })?;
        Ok((PyBytes::new(py, &m), PyBytes::new(py, &r)))
    }

    /// Propose fresh keys for our leaf; returns (proposal, ProposalRef). (A committer never
    /// commits its own Update proposal: it commits with a path instead.)
    fn propose_update<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let gid = &self.gid;
        let (m, r) = run(py, &self.shared, |st| st.op_propose_update(gid))?;
        Ok((PyBytes::new(py, &m), PyBytes::new(py, &r)))
    }

    /// Propose our own removal; returns (proposal, ProposalRef). Another member commits it.
    fn propose_leave<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
        let gid = &self.gid;
        let (m, r) = run(py, &self.shared, |st| st.op_propose_leave(gid))?;
        Ok((PyBytes::new(py, &m), PyBytes::new(py, &r)))
    }

    /// Refs of the proposals in the proposal store (ours and received), in store order.
    fn pending_proposals<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let gid = &self.gid;
        let refs = run(py, &self.shared, |st| {
            Ok(proposal_refs(st.group_view(gid)?))
        })?;
        Ok(refs.iter().map(|r| PyBytes::new(py, r)).collect())
    }

    /// Empty the proposal store (proposals are valid for one epoch only; a commit that
    /// changes the epoch empties it anyway).
    fn clear_proposals(&self, py: Python<'_>) -> PyResult<()> {
        let gid = &self.gid;
        run(py, &self.shared, |st| st.op_clear_proposals(gid))
    }

    /// The ordered committer list (fingerprints) of the group context; empty for a group
    /// made before the list existed.
    fn committers(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let gid = &self.gid;
        run(py, &self.shared, |st| {
            committers_of(st.group_view(gid)?.extensions())
        })
    }

    /// Epochs whose message secrets are kept, oldest first (a message of one of them, or of
    /// the current epoch, decrypts).
    fn past_epochs(&self, py: Python<'_>) -> PyResult<Vec<u64>> {
        let gid = &self.gid;
        run(py, &self.shared, |st| st.op_past_epochs(gid))
    }

    /// Delete the message secrets of all but the newest `keep` past epochs (forward
    /// secrecy); returns how many were deleted.
    fn prune_past_epochs(&self, py: Python<'_>, keep: usize) -> PyResult<usize> {
        let gid = &self.gid;
        run(py, &self.shared, |st| st.op_prune_past_epochs(gid, keep))
    }

    /// RFC 9420 epoch authenticator of the current epoch: equal on all members that are
    /// in the same epoch of the same group state.
    fn epoch_authenticator<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let gid = &self.gid;
        let a = run(py, &self.shared, |st| {
            Ok(st
                .group_view(gid)?
                .epoch_authenticator()
                .as_slice()
                .to_vec())
        })?;
        Ok(PyBytes::new(py, &a))
    }

    /// Make our pending commit our state: the epoch advances. Call it once the node has
    /// stored the commit's fan-out, never before (a commit nobody else gets forks the group).
    /// Raises NoPendingCommit when nothing is pending: never created, cleared, or superseded
    /// by another member's commit for the same epoch that `process` merged first (then our
    /// commit is lost and must be made again). An error, not a no-op, so the caller cannot
    /// believe a change happened that did not.
    /// Returns the commit's Event (covered proposals, added/removed members, authenticator).
    fn merge_pending_commit(&self, py: Python<'_>) -> PyResult<Event> {
        let gid = &self.gid;
        let p = run(py, &self.shared, |st| st.op_merge_pending_commit(gid))?;
        Ok(Event::new(py, p))
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
        let p = run_tx(to, |st| st.op_process(gid, &ct)).expect("process");
        assert_eq!((p.kind, p.data.as_slice()), ("application", text));
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
        let p = run_tx(&mut b, |st| st.op_process(&gid, &ct)).expect("process");
        assert_eq!(
            (p.kind, p.data.as_slice()),
            ("application", b"m1".as_slice())
        );
        assert!(!pending(&mut b, &gid));
        talk(&mut b, &mut a, &gid, b"after the panic");
    }

    /// Texts of a past epoch read late move that epoch's ratchet: its record must be
    /// rewritten (not skipped as unchanged by the encoding comparison of the storage),
    /// while the other past records stay out of the log. Every write is checked against
    /// the whole JSON, scanned (`VERIFY_SPLIT`); after a reopen from the log the second
    /// late text still decrypts and the first is refused as already read.
    #[test]
    fn late_texts_of_a_past_epoch_rewrite_only_its_record() {
        let tmp = TmpDir::new("late-past");
        let (mut a, mut b) = (new_state(&tmp, "a"), new_state(&tmp, "b"));
        let gid = group_of(&mut [&mut a, &mut b]);
        let late: Vec<Vec<u8>> = (0..2)
            .map(|i| run_tx(&mut a, |st| st.op_encrypt(&gid, &[b'l', i])).expect("encrypt"))
            .collect();
        for _ in 0..3 {
            let c = run_tx(&mut a, |st| {
                let c = st.op_update(&gid)?;
                st.op_merge_pending_commit(&gid)?;
                Ok(c)
            })
            .expect("update");
            run_tx(&mut b, |st| st.op_process(&gid, &c)).expect("process commit");
        }
        let past_records = |st: &State| -> Vec<(Vec<u8>, Vec<u8>)> {
            records(st)
                .into_iter()
                .filter(|(k, _)| k.starts_with(crate::tracked_storage::MESSAGE_SECRETS_PAST_LABEL))
                .collect()
        };
        let before = past_records(&b);
        assert_eq!(before.len(), 3, "three past epochs kept");
        let p = run_tx(&mut b, |st| st.op_process(&gid, &late[0])).expect("late text");
        assert_eq!(p.data, b"l\x00");
        let after = past_records(&b);
        let changed: Vec<usize> = (0..3).filter(|&i| before[i] != after[i]).collect();
        assert_eq!(
            changed,
            vec![0],
            "only the late text's epoch record changes"
        );
        talk(&mut a, &mut b, &gid, b"current epoch");
        assert!(
            past_records(&b) == after,
            "past records rewritten by a current text"
        );
        drop(b);
        let mut b = State::open(&tmp.path().join("b"), SECRET, false).expect("reopen");
        assert!(past_records(&b) == after, "the log holds what memory held");
        assert!(run_tx(&mut b, |st| st.op_process(&gid, &late[0])).is_err());
        let p = run_tx(&mut b, |st| st.op_process(&gid, &late[1])).expect("second late text");
        assert_eq!(p.data, b"l\x01");
    }

    /// A group stored with the old configuration (no past epochs, a 16-message ratchet
    /// window) gets the current one on its next change, and then keeps past epochs.
    #[test]
    fn stored_groups_get_the_current_configuration() {
        let tmp = TmpDir::new("upgrade");
        let (mut a, mut b) = (new_state(&tmp, "a"), new_state(&tmp, "b"));
        let gid = group_of(&mut [&mut a, &mut b]);
        let old = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .sender_ratchet_configuration(SenderRatchetConfiguration::new(16, 1000))
            .max_past_epochs(0)
            .build();
        run_tx(&mut b, |st| {
            let gid = gid.clone();
            st.ensure_loaded(&gid)?;
            st.touch(&gid);
            let State {
                provider, groups, ..
            } = st;
            let g = groups.get_mut(&gid).ok_or_else(|| unknown_group(&gid))?;
            g.set_configuration(&provider.storage, &old)
                .map_err(|e| Error::from_dbg(Kind::Storage, "downgrade", e))
        })
        .expect("store the old configuration");
        drop(b);
        let mut b = State::open(&tmp.path().join("b"), SECRET, false).expect("reopen");
        let cfg = run_tx(&mut b, |st| {
            Ok(st.group_view(&gid)?.configuration().clone())
        })
        .expect("config");
        assert_eq!(cfg, old);
        let stale = run_tx(&mut a, |st| st.op_encrypt(&gid, b"epoch 1")).expect("encrypt");
        let commit = run_tx(&mut a, |st| {
            let c = st.op_update(&gid)?;
            st.op_merge_pending_commit(&gid)?;
            Ok(c)
        })
        .expect("commit");
        run_tx(&mut b, |st| st.op_process(&gid, &commit)).expect("process commit");
        let cfg = run_tx(&mut b, |st| {
            Ok(st.group_view(&gid)?.configuration().clone())
        })
        .expect("config");
        assert_eq!(cfg, join_config());
        assert_eq!(
            run_tx(&mut b, |st| st.op_past_epochs(&gid)).expect("past"),
            vec![1]
        );
        let p = run_tx(&mut b, |st| st.op_process(&gid, &stale)).expect("late message");
        assert_eq!(
            (p.data.as_slice(), p.message_epoch),
            (b"epoch 1".as_slice(), 1)
        );
    }

    /// A committer list extension that does not parse is a typed InvalidMessage (a member
    /// could commit one; `process` then refuses the commit before merging it), and the
    /// caller's list is checked before any commit is made.
    #[test]
    fn committer_list_encoding_is_checked() {
        let fp = [7u8; 32];
        let ok = Extensions::single(committers_extension(&[fp, [8u8; 32]])).expect("ext");
        assert_eq!(
            committers_of(&ok).expect("parses"),
            vec![hex(&fp), hex(&[8u8; 32])]
        );
        assert_eq!(
            committers_of(&Extensions::empty()).expect("absent"),
            Vec::<String>::new()
        );
        for raw in [vec![], vec![1u8; 31], vec![1u8; 33], vec![1u8; 32 * 256]] {
            let bad = Extensions::single(Extension::Unknown(
                COMMITTERS_EXTENSION,
                UnknownExtension(raw),
            ))
            .expect("ext");
            assert_eq!(
                committers_of(&bad).expect_err("malformed").kind,
                Kind::InvalidMessage
            );
        }
        assert_eq!(
            parse_committers(&[hex(&fp), hex(&fp).to_uppercase()])
                .expect_err("duplicate")
                .kind,
            Kind::Argument
        );
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
