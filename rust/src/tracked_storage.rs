//! OpenMLS storage provider that remembers which records changed, and can undo them.
//!
//! Adapted from `openmls_memory_storage` 0.6.0 (MIT, the OpenMLS authors): same key
//! layout (`label || key || version`) and serialization, so existing stores stay readable,
//! but the map is a [`TrackedMap`]: every write or delete of an operation is remembered
//! together with the value the key had before. The identity (`mls.rs`) runs each
//! operation as a transaction over it: on success the changed records become one log
//! record (`persist.rs`), so an encrypt writes only the records it touched instead of the
//! whole group; on error or panic they are put back exactly as they were.
//!
//! Differences from the original besides tracking: `unwrap()`s became typed errors; a
//! key that fails to serialize is an error (the original's `unwrap_or_default()` turned it
//! into an empty key, i.e. a silent read or write of the wrong record); every key is built
//! by one helper ([`storage_key`]) instead of per-method copies, which also fixes
//! `clear_proposal_queue` (the original deleted the queued proposals under a key without
//! label and version, which never exists, so they stayed in the store forever).

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use openmls_traits::storage::*;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{json_ser, split_ser};

/// Key-value map plus, for the open transaction, the prior value of every changed key.
#[derive(Debug, Default)]
pub struct TrackedMap {
    map: HashMap<Vec<u8>, Vec<u8>>,
    /// key -> value before the transaction's first change to it (`None`: it was absent).
    undo: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// key -> binary encoding (`split_ser::encode`) of the value the key holds, set by the
    /// writer of a past epoch's message secrets after writing it. Every other change of
    /// the key (write, delete, rollback, log replay) drops the entry: the map is private,
    /// so a fingerprint present always describes the value present. (The whole encoding,
    /// not a hash of it: comparing it costs less than hashing, and it is about a third of
    /// the JSON record it stands for.)
    fingerprints: HashMap<Vec<u8>, Vec<u8>>,
}

impl TrackedMap {
    pub fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.fingerprints.remove(&key);
        // The replaced value is the prior one if this is the key's first change: no copy.
        let old = self.map.insert(key.clone(), value);
        self.undo.entry(key).or_insert(old);
    }

    pub fn remove(&mut self, key: &[u8]) {
        self.fingerprints.remove(key);
        if let Some(old) = self.map.remove(key) {
            self.undo.entry(key.to_vec()).or_insert(Some(old));
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<&Vec<u8>> {
        self.map.get(key)
    }

    /// The stored value, created from `default` if absent, for changing in place.
    fn entry_or_insert(&mut self, key: Vec<u8>, default: &[u8]) -> &mut Vec<u8> {
        self.fingerprints.remove(&key);
        if !self.undo.contains_key(&key) {
            self.undo.insert(key.clone(), self.map.get(&key).cloned());
        }
        self.map.entry(key).or_insert_with(|| default.to_vec())
    }

    /// Load a record without tracking it (replaying the log).
    pub fn load(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.fingerprints.remove(&key);
        match value {
            Some(v) => {
                self.map.insert(key, v);
            }
            None => {
                self.map.remove(&key);
            }
        }
    }

    /// What the open transaction changed, sorted by key: `(key, Some(value))`, or
    /// `(key, None)` for a delete. A key written back to its prior value is left out.
    pub fn pending_changes(&self) -> Vec<(&[u8], Option<&[u8]>)> {
        let mut out: Vec<(&[u8], Option<&[u8]>)> = self
            .undo
            .iter()
            .filter_map(|(k, prior)| {
                let now = self.map.get(k);
                (now != prior.as_ref()).then(|| (k.as_slice(), now.map(Vec::as_slice)))
            })
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(b.0));
        out
    }

    /// True while changes are neither committed nor rolled back.
    pub fn in_transaction(&self) -> bool {
        !self.undo.is_empty()
    }

    /// The changes are durable (or deliberately kept): forget how to undo them.
    pub fn commit(&mut self) {
        self.undo.clear();
    }

    /// Put every key changed since the last commit back to its prior value.
    pub fn rollback(&mut self) {
        for (k, prior) in self.undo.drain() {
            self.fingerprints.remove(&k);
            match prior {
                Some(v) => {
                    self.map.insert(k, v);
                }
                None => {
                    self.map.remove(&k);
                }
            }
        }
    }

    /// The fingerprint recorded for the value `key` holds, if any (see `fingerprints`).
    fn fingerprint(&self, key: &[u8]) -> Option<&[u8]> {
        self.fingerprints.get(key).map(Vec::as_slice)
    }

    /// Record the fingerprint of the value `key` holds now (ignored for an absent key).
    fn set_fingerprint(&mut self, key: Vec<u8>, fp: Vec<u8>) {
        if self.map.contains_key(&key) {
            self.fingerprints.insert(key, fp);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Vec<u8>)> + Clone {
        self.map.iter()
    }
}

/// The OpenMLS storage provider used by every identity.
#[derive(Debug, Default)]
pub struct TrackedStorage {
    pub values: RwLock<TrackedMap>,
}

impl TrackedStorage {
    /// Undo the open transaction, also after a panic poisoned the lock mid-change:
    /// rolling back restores the state from before the operation, so the poison is
    /// cleared with it.
    pub fn rollback(&self) {
        let mut m = self.values.write().unwrap_or_else(PoisonError::into_inner);
        m.rollback();
        drop(m);
        self.values.clear_poison();
    }
}

/// Errors of the storage provider (mapped to `StorageError` in Python).
#[derive(Debug, Copy, Clone, PartialEq, Eq)]
pub enum StoreError {
    SerializationError,
    Poisoned,
    Missing,
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let msg = match self {
            StoreError::SerializationError => "error (de)serializing a stored key or value",
            StoreError::Poisoned => "storage lock poisoned",
            StoreError::Missing => "a referenced stored record is missing",
        };
        f.write_str(msg)
    }
}

impl std::error::Error for StoreError {}

impl From<serde_json::Error> for StoreError {
    fn from(_: serde_json::Error) -> Self {
        Self::SerializationError
    }
}

type Res<T> = Result<T, StoreError>;

/// The one place a storage key is built: `label || key || CURRENT_VERSION (u16 BE)`, the
/// layout of `openmls_memory_storage`.
fn storage_key(label: &[u8], key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(label.len() + key.len() + 2);
    out.extend_from_slice(label);
    out.extend_from_slice(key);
    out.extend_from_slice(&CURRENT_VERSION.to_be_bytes());
    out
}

/// Serialize a key or a value; failing is an error, never an empty key. The bytes are
/// serde_json's (`json_ser` writes them faster).
fn json<T: Serialize + ?Sized>(v: &T) -> Res<Vec<u8>> {
    Ok(json_ser::to_vec(v)?)
}

/// Key (before label/version) of one past epoch's record: group id JSON || epoch (u64 BE).
fn past_key(gid: &[u8], epoch: u64) -> Vec<u8> {
    let mut k = gid.to_vec();
    k.extend_from_slice(&epoch.to_be_bytes());
    k
}

const PAST_FIELD: &[u8] = b"\"past_epoch_trees\":[";

/// End (exclusive) of the JSON value starting at `start` in compact serde_json output, or
/// None if it does not end inside `json`. Tracks nesting and strings (with escapes).
fn value_end(json: &[u8], start: usize) -> Option<usize> {
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, &c) in json.iter().enumerate().skip(start) {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => in_str = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' if depth == 0 => return Some(i),
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            b',' if depth == 0 => return Some(i),
            _ => {}
        }
    }
    None
}

/// (index after an array's '[', its element spans, index of its ']').
type ArraySpans = (usize, Vec<(usize, usize)>, usize);
/// (epoch, serialized EpochTree) of each kept past epoch.
type PastTrees<'a> = Vec<(u64, &'a [u8])>;

/// The elements of the `past_epoch_trees` array of a serialized MessageSecretsStore:
/// (index after its '[', element spans, index of its ']').
fn past_elements(json: &[u8]) -> Option<ArraySpans> {
    // serde_json writes struct fields in order, and the store's first fields are
    // `max_epochs` and `past_epoch_trees`: the first occurrence is the top-level field.
    let open = json
        .windows(PAST_FIELD.len())
        .position(|w| w == PAST_FIELD)?
        + PAST_FIELD.len();
    let mut spans = Vec::new();
    let mut i = open;
    loop {
        match json.get(i)? {
            b']' => return Some((open, spans, i)),
            b',' if !spans.is_empty() => i += 1,
            _ => {}
        }
        let end = value_end(json, i)?;
        if end <= i {
            return None;
        }
        spans.push((i, end));
        i = end;
    }
}

/// The epoch of one serialized EpochTree (`{"epoch":N,...}`).
fn tree_epoch(tree: &[u8]) -> Option<u64> {
    let rest = tree.strip_prefix(b"{\"epoch\":")?;
    let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

/// Split a serialized MessageSecretsStore into the main record (epoch numbers in place of
/// the past trees) and (epoch, tree) pairs; None if the layout is not the expected one
/// (then it is stored whole, as before).
fn split_past(full: &[u8]) -> Option<(Vec<u8>, PastTrees<'_>)> {
    let (open, spans, close) = past_elements(full)?;
    let mut past = Vec::with_capacity(spans.len());
    let mut main = full[..open].to_vec();
    for (n, (a, b)) in spans.into_iter().enumerate() {
        let tree = &full[a..b];
        let epoch = tree_epoch(tree)?;
        if n > 0 {
            main.push(b',');
        }
        main.extend_from_slice(epoch.to_string().as_bytes());
        past.push((epoch, tree));
    }
    main.extend_from_slice(&full[close..]);
    Some((main, past))
}

/// Epochs a stored main record refers to (none for a record stored whole).
fn past_refs(main: &[u8]) -> Vec<u64> {
    let Some((_, spans, _)) = past_elements(main) else {
        return Vec::new();
    };
    spans
        .into_iter()
        .map_while(|(a, b)| std::str::from_utf8(&main[a..b]).ok()?.parse().ok())
        .collect()
}

/// The full serialization again from a main record and the past records it names; a
/// record stored whole (before the split) comes back as it is.
fn join_past<'a>(main: &[u8], past: impl Fn(u64) -> Option<&'a [u8]>) -> Res<Vec<u8>> {
    let Some((open, spans, close)) = past_elements(main) else {
        return Ok(main.to_vec());
    };
    let is_ref = |(a, _): &(usize, usize)| main.get(*a).is_some_and(u8::is_ascii_digit);
    if spans.is_empty() || !spans.iter().all(is_ref) {
        return Ok(main.to_vec());
    }
    let mut full = main[..open].to_vec();
    for (n, (a, b)) in spans.into_iter().enumerate() {
        let epoch: u64 = std::str::from_utf8(&main[a..b])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(StoreError::SerializationError)?;
        if n > 0 {
            full.push(b',');
        }
        full.extend_from_slice(past(epoch).ok_or(StoreError::Missing)?);
    }
    full.extend_from_slice(&main[close..]);
    Ok(full)
}

#[cfg(test)]
std::thread_local! {
    /// Tests check every fast-path write against the whole JSON, scanned (on by default;
    /// off where a test counts JSON formattings).
    pub static VERIFY_SPLIT: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Collects the past epochs' trees of a message secrets store being written: for each,
/// its epoch, its JSON if the stored record may differ (None: the record holds exactly
/// this tree already, by fingerprint) and its fingerprint.
struct PastSink<'m> {
    map: &'m TrackedMap,
    gid: &'m [u8],
    scratch: Vec<u8>,
    trees: Vec<PastTree>,
}

/// (epoch, JSON to store or None if unchanged, fingerprint).
type PastTree = (u64, Option<Vec<u8>>, Option<Vec<u8>>);

impl split_ser::TreeSink for PastSink<'_> {
    fn tree<T: Serialize + ?Sized>(&mut self, tree: &T) -> Result<u64, split_ser::Unsupported> {
        let epoch = split_ser::encode(tree, &mut self.scratch)?;
        let epoch = epoch.ok_or(split_ser::Unsupported)?;
        let k = storage_key(MESSAGE_SECRETS_PAST_LABEL, &past_key(self.gid, epoch));
        if self.map.fingerprint(&k) == Some(self.scratch.as_slice()) {
            self.trees.push((epoch, None, None));
            return Ok(epoch);
        }
        let j = json_ser::to_vec(tree).map_err(|_| split_ser::Unsupported)?;
        if tree_epoch(&j) != Some(epoch) {
            return Err(split_ser::Unsupported);
        }
        self.trees
            .push((epoch, Some(j), Some(self.scratch.clone())));
        Ok(epoch)
    }
}

impl TrackedStorage {
    fn write(&self, label: &[u8], key: &[u8], value: Vec<u8>) -> Res<()> {
        let mut values = self.values.write().map_err(|_| StoreError::Poisoned)?;
        values.insert(storage_key(label, key), value);
        Ok(())
    }

    fn read<V: DeserializeOwned>(&self, label: &[u8], key: &[u8]) -> Res<Option<V>> {
        let values = self.values.read().map_err(|_| StoreError::Poisoned)?;
        match values.get(&storage_key(label, key)) {
            Some(v) => Ok(Some(serde_json::from_slice(v)?)),
            None => Ok(None),
        }
    }

    fn delete(&self, label: &[u8], key: &[u8]) -> Res<()> {
        let mut values = self.values.write().map_err(|_| StoreError::Poisoned)?;
        values.remove(&storage_key(label, key));
        Ok(())
    }

    /// Lists are stored as a JSON array of the items' serializations.
    fn read_list<V: DeserializeOwned>(&self, label: &[u8], key: &[u8]) -> Res<Vec<V>> {
        let values = self.values.read().map_err(|_| StoreError::Poisoned)?;
        let items: Vec<Vec<u8>> = match values.get(&storage_key(label, key)) {
            Some(list) => serde_json::from_slice(list)?,
            None => return Ok(Vec::new()),
        };
        items
            .iter()
            .map(|item| serde_json::from_slice(item).map_err(StoreError::from))
            .collect()
    }

    /// Change a stored list in place (created empty if absent).
    fn edit_list(&self, label: &[u8], key: &[u8], edit: impl FnOnce(&mut Vec<Vec<u8>>)) -> Res<()> {
        let mut values = self.values.write().map_err(|_| StoreError::Poisoned)?;
        let bytes = values.entry_or_insert(storage_key(label, key), b"[]");
        let mut list: Vec<Vec<u8>> = serde_json::from_slice(bytes)?;
        edit(&mut list);
        let new = json(&list)?;
        *bytes = new;
        Ok(())
    }

    fn append(&self, label: &[u8], key: &[u8], item: Vec<u8>) -> Res<()> {
        self.edit_list(label, key, |list| list.push(item))
    }

    fn remove_item(&self, label: &[u8], key: &[u8], item: Vec<u8>) -> Res<()> {
        self.edit_list(label, key, |list| {
            if let Some(pos) = list.iter().position(|stored| stored == &item) {
                list.remove(pos);
            }
        })
    }
}

const KEY_PACKAGE_LABEL: &[u8] = b"KeyPackage";
const PSK_LABEL: &[u8] = b"Psk";
const ENCRYPTION_KEY_PAIR_LABEL: &[u8] = b"EncryptionKeyPair";
const SIGNATURE_KEY_PAIR_LABEL: &[u8] = b"SignatureKeyPair";
const EPOCH_KEY_PAIRS_LABEL: &[u8] = b"EpochKeyPairs";

// related to PublicGroup
const TREE_LABEL: &[u8] = b"Tree";
const GROUP_CONTEXT_LABEL: &[u8] = b"GroupContext";
const INTERIM_TRANSCRIPT_HASH_LABEL: &[u8] = b"InterimTranscriptHash";
const CONFIRMATION_TAG_LABEL: &[u8] = b"ConfirmationTag";

// related to MlsGroup
const JOIN_CONFIG_LABEL: &[u8] = b"MlsGroupJoinConfig";
const OWN_LEAF_NODES_LABEL: &[u8] = b"OwnLeafNodes";
const GROUP_STATE_LABEL: &[u8] = b"GroupState";
const QUEUED_PROPOSAL_LABEL: &[u8] = b"QueuedProposal";
const PROPOSAL_QUEUE_REFS_LABEL: &[u8] = b"ProposalQueueRefs";
const OWN_LEAF_NODE_INDEX_LABEL: &[u8] = b"OwnLeafNodeIndex";
const EPOCH_SECRETS_LABEL: &[u8] = b"EpochSecrets";
const RESUMPTION_PSK_STORE_LABEL: &[u8] = b"ResumptionPsk";
const MESSAGE_SECRETS_LABEL: &[u8] = b"MessageSecrets";
/// One record per kept past epoch of a group's message secrets (see `split_past`).
pub const MESSAGE_SECRETS_PAST_LABEL: &[u8] = b"MessageSecretsPast";

/// Labels of the records that belong to one group: their key (after the label) starts with
/// the group id's serialization, or, for a queued proposal, with the `(group_id, ref)` pair.
/// Everything else (KeyPackages, HPKE init keys, signature keys, PSKs) is per identity.
const GROUP_LABELS: &[&[u8]] = &[
    TREE_LABEL,
    GROUP_CONTEXT_LABEL,
    INTERIM_TRANSCRIPT_HASH_LABEL,
    CONFIRMATION_TAG_LABEL,
    JOIN_CONFIG_LABEL,
    OWN_LEAF_NODES_LABEL,
    GROUP_STATE_LABEL,
    QUEUED_PROPOSAL_LABEL,
    PROPOSAL_QUEUE_REFS_LABEL,
    OWN_LEAF_NODE_INDEX_LABEL,
    EPOCH_SECRETS_LABEL,
    RESUMPTION_PSK_STORE_LABEL,
    MESSAGE_SECRETS_LABEL,
    MESSAGE_SECRETS_PAST_LABEL,
    EPOCH_KEY_PAIRS_LABEL,
];

/// The serialization of a group id as it appears in storage keys.
pub fn group_key_part(group_id: &[u8]) -> Res<Vec<u8>> {
    json(&openmls::group::GroupId::from_slice(group_id))
}

/// True when `key` is an OpenMLS record of the group whose id serializes to `gid_json`
/// (from [`group_key_part`]): its tree, context, secrets (current and past epochs), join
/// config, own leaf nodes and index, group state (with a pending commit), proposal store
/// and per-epoch leaf key pairs. Why by key and not by asking OpenMLS: a group-scoped
/// snapshot must hold every record a later operation reads, including ones OpenMLS only
/// reads on demand (the epoch key pairs of the epoch a sibling commit is processed in).
pub fn is_group_record(key: &[u8], gid_json: &[u8]) -> bool {
    GROUP_LABELS.iter().any(|label| {
        key.strip_prefix(*label).is_some_and(|rest| {
            rest.starts_with(gid_json)
                || (rest.first() == Some(&b'[')
                    && rest[1..].starts_with(gid_json)
                    && rest.get(1 + gid_json.len()) == Some(&b','))
        })
    })
}

/// Key of the epoch key pairs: the three serializations concatenated (the original layout).
fn epoch_key_pairs_id(
    group_id: &impl traits::GroupId<CURRENT_VERSION>,
    epoch: &impl traits::EpochKey<CURRENT_VERSION>,
    leaf_index: u32,
) -> Res<Vec<u8>> {
    let mut key = json(group_id)?;
    key.extend_from_slice(&json(epoch)?);
    key.extend_from_slice(&json(&leaf_index)?);
    Ok(key)
}

impl StorageProvider<CURRENT_VERSION> for TrackedStorage {
    type Error = StoreError;

    fn queue_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
        proposal: &QueuedProposal,
    ) -> Result<(), Self::Error> {
        self.write(
            QUEUED_PROPOSAL_LABEL,
            &json(&(group_id, proposal_ref))?,
            json(proposal)?,
        )?;
        self.append(
            PROPOSAL_QUEUE_REFS_LABEL,
            &json(group_id)?,
            json(proposal_ref)?,
        )
    }

    fn write_tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        tree: &TreeSync,
    ) -> Result<(), Self::Error> {
        self.write(TREE_LABEL, &json(group_id)?, json(tree)?)
    }

    fn write_interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        interim_transcript_hash: &InterimTranscriptHash,
    ) -> Result<(), Self::Error> {
        self.write(
            INTERIM_TRANSCRIPT_HASH_LABEL,
            &json(group_id)?,
            json(interim_transcript_hash)?,
        )
    }

    fn write_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_context: &GroupContext,
    ) -> Result<(), Self::Error> {
        self.write(GROUP_CONTEXT_LABEL, &json(group_id)?, json(group_context)?)
    }

    fn write_confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        confirmation_tag: &ConfirmationTag,
    ) -> Result<(), Self::Error> {
        self.write(
            CONFIRMATION_TAG_LABEL,
            &json(group_id)?,
            json(confirmation_tag)?,
        )
    }

    fn write_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
        signature_key_pair: &SignatureKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(
            SIGNATURE_KEY_PAIR_LABEL,
            &json(public_key)?,
            json(signature_key_pair)?,
        )
    }

    fn queued_proposal_refs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<ProposalRef>, Self::Error> {
        self.read_list(PROPOSAL_QUEUE_REFS_LABEL, &json(group_id)?)
    }

    fn queued_proposals<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
        QueuedProposal: traits::QueuedProposal<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<(ProposalRef, QueuedProposal)>, Self::Error> {
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_QUEUE_REFS_LABEL, &json(group_id)?)?;
        refs.into_iter()
            .map(|proposal_ref| {
                let proposal = self
                    .read(QUEUED_PROPOSAL_LABEL, &json(&(group_id, &proposal_ref))?)?
                    .ok_or(StoreError::Missing)?;
                Ok((proposal_ref, proposal))
            })
            .collect()
    }

    fn tree<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        TreeSync: traits::TreeSync<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<TreeSync>, Self::Error> {
        self.read(TREE_LABEL, &json(group_id)?)
    }

    fn group_context<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupContext: traits::GroupContext<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupContext>, Self::Error> {
        self.read(GROUP_CONTEXT_LABEL, &json(group_id)?)
    }

    fn interim_transcript_hash<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        InterimTranscriptHash: traits::InterimTranscriptHash<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<InterimTranscriptHash>, Self::Error> {
        self.read(INTERIM_TRANSCRIPT_HASH_LABEL, &json(group_id)?)
    }

    fn confirmation_tag<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ConfirmationTag: traits::ConfirmationTag<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ConfirmationTag>, Self::Error> {
        self.read(CONFIRMATION_TAG_LABEL, &json(group_id)?)
    }

    fn signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
        SignatureKeyPair: traits::SignatureKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<Option<SignatureKeyPair>, Self::Error> {
        self.read(SIGNATURE_KEY_PAIR_LABEL, &json(public_key)?)
    }

    fn write_key_package<
        HashReference: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &HashReference,
        key_package: &KeyPackage,
    ) -> Result<(), Self::Error> {
        self.write(KEY_PACKAGE_LABEL, &json(hash_ref)?, json(key_package)?)
    }

    fn write_psk<
        PskId: traits::PskId<CURRENT_VERSION>,
        PskBundle: traits::PskBundle<CURRENT_VERSION>,
    >(
        &self,
        psk_id: &PskId,
        psk: &PskBundle,
    ) -> Result<(), Self::Error> {
        self.write(PSK_LABEL, &json(psk_id)?, json(psk)?)
    }

    fn write_encryption_key_pair<
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
        key_pair: &HpkeKeyPair,
    ) -> Result<(), Self::Error> {
        self.write(
            ENCRYPTION_KEY_PAIR_LABEL,
            &json(public_key)?,
            json(key_pair)?,
        )
    }

    fn key_package<
        KeyPackageRef: traits::HashReference<CURRENT_VERSION>,
        KeyPackage: traits::KeyPackage<CURRENT_VERSION>,
    >(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<Option<KeyPackage>, Self::Error> {
        self.read(KEY_PACKAGE_LABEL, &json(hash_ref)?)
    }

    fn psk<PskBundle: traits::PskBundle<CURRENT_VERSION>, PskId: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskId,
    ) -> Result<Option<PskBundle>, Self::Error> {
        self.read(PSK_LABEL, &json(psk_id)?)
    }

    fn encryption_key_pair<
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
        EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<Option<HpkeKeyPair>, Self::Error> {
        self.read(ENCRYPTION_KEY_PAIR_LABEL, &json(public_key)?)
    }

    fn delete_signature_key_pair<
        SignaturePublicKey: traits::SignaturePublicKey<CURRENT_VERSION>,
    >(
        &self,
        public_key: &SignaturePublicKey,
    ) -> Result<(), Self::Error> {
        self.delete(SIGNATURE_KEY_PAIR_LABEL, &json(public_key)?)
    }

    fn delete_encryption_key_pair<EncryptionKey: traits::EncryptionKey<CURRENT_VERSION>>(
        &self,
        public_key: &EncryptionKey,
    ) -> Result<(), Self::Error> {
        self.delete(ENCRYPTION_KEY_PAIR_LABEL, &json(public_key)?)
    }

    fn delete_key_package<KeyPackageRef: traits::HashReference<CURRENT_VERSION>>(
        &self,
        hash_ref: &KeyPackageRef,
    ) -> Result<(), Self::Error> {
        self.delete(KEY_PACKAGE_LABEL, &json(hash_ref)?)
    }

    fn delete_psk<PskKey: traits::PskId<CURRENT_VERSION>>(
        &self,
        psk_id: &PskKey,
    ) -> Result<(), Self::Error> {
        self.delete(PSK_LABEL, &json(psk_id)?)
    }

    fn group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupState>, Self::Error> {
        self.read(GROUP_STATE_LABEL, &json(group_id)?)
    }

    fn write_group_state<
        GroupState: traits::GroupState<CURRENT_VERSION>,
        GroupId: traits::GroupId<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_state: &GroupState,
    ) -> Result<(), Self::Error> {
        self.write(GROUP_STATE_LABEL, &json(group_id)?, json(group_state)?)
    }

    fn delete_group_state<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(GROUP_STATE_LABEL, &json(group_id)?)
    }

    fn message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MessageSecrets>, Self::Error> {
        let gid = json(group_id)?;
        let values = self.values.read().map_err(|_| StoreError::Poisoned)?;
        let Some(main) = values.get(&storage_key(MESSAGE_SECRETS_LABEL, &gid)) else {
            return Ok(None);
        };
        let full = join_past(main, |epoch| {
            values
                .get(&storage_key(
                    MESSAGE_SECRETS_PAST_LABEL,
                    &past_key(&gid, epoch),
                ))
                .map(Vec::as_slice)
        })?;
        Ok(Some(serde_json::from_slice(&full)?))
    }

    /// Stored split: the past epochs' trees each in their own record, the rest (with the
    /// epoch numbers in place of the trees) in the main one. OpenMLS rewrites the whole
    /// store whenever the current epoch's ratchet moves (every message sent or read);
    /// with up to MAX_PAST_EPOCHS kept that was ~1 MB per message at 64 members. Now the
    /// past records are written back unchanged and the transaction logs only what changed.
    fn write_message_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MessageSecrets: traits::MessageSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        message_secrets: &MessageSecrets,
    ) -> Result<(), Self::Error> {
        let gid = json(group_id)?;
        let mut values = self.values.write().map_err(|_| StoreError::Poisoned)?;
        let main_key = storage_key(MESSAGE_SECRETS_LABEL, &gid);
        let old_epochs = match values.get(&main_key) {
            Some(old) => past_refs(old),
            None => Vec::new(),
        };
        let mut sink = PastSink {
            map: &values,
            gid: &gid,
            // One past epoch's encoding at 64 members is about 20 KB: no regrowth after it.
            scratch: Vec::with_capacity(32 * 1024),
            trees: Vec::new(),
        };
        let (main, mut past) = match split_ser::split_store(message_secrets, &mut sink) {
            Ok(main) => (main, sink.trees),
            Err(_) => {
                // Not the expected layout: the whole JSON, split by scanning it.
                let full = json(message_secrets)?;
                let (main, past) = match split_past(&full) {
                    Some((main, past)) => (
                        main,
                        past.into_iter()
                            .map(|(e, t)| (e, Some(t.to_vec()), None))
                            .collect(),
                    ),
                    None => (full.clone(), Vec::new()),
                };
                (main, past)
            }
        };
        #[cfg(test)]
        if VERIFY_SPLIT.with(std::cell::Cell::get) {
            // The fast path must store exactly what the whole JSON, scanned, stores.
            let full = json(message_secrets)?;
            if let Some((main_scan, past_scan)) = split_past(&full) {
                assert_eq!(main_scan, main, "main record differs from the scan");
                assert_eq!(past_scan.len(), past.len());
                for ((e1, t1), (e2, t2, _)) in past_scan.iter().zip(&past) {
                    assert_eq!(e1, e2);
                    let k = storage_key(MESSAGE_SECRETS_PAST_LABEL, &past_key(&gid, *e1));
                    let stored = t2.as_deref().or(values.get(&k).map(Vec::as_slice));
                    assert_eq!(Some(*t1), stored, "past tree of epoch {e1} differs");
                }
            }
        }
        for (epoch, tree, fp) in past.iter_mut() {
            let k = storage_key(MESSAGE_SECRETS_PAST_LABEL, &past_key(&gid, *epoch));
            if let Some(tree) = tree {
                if values.get(&k) != Some(tree) {
                    values.insert(k.clone(), std::mem::take(tree));
                }
            }
            if let Some(fp) = fp.take() {
                values.set_fingerprint(k, fp);
            }
        }
        for epoch in old_epochs {
            if !past.iter().any(|(e, _, _)| *e == epoch) {
                values.remove(&storage_key(
                    MESSAGE_SECRETS_PAST_LABEL,
                    &past_key(&gid, epoch),
                ));
            }
        }
        values.insert(main_key, main);
        Ok(())
    }

    fn delete_message_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        let gid = json(group_id)?;
        let mut values = self.values.write().map_err(|_| StoreError::Poisoned)?;
        let main_key = storage_key(MESSAGE_SECRETS_LABEL, &gid);
        if let Some(old) = values.get(&main_key) {
            for epoch in past_refs(old) {
                values.remove(&storage_key(
                    MESSAGE_SECRETS_PAST_LABEL,
                    &past_key(&gid, epoch),
                ));
            }
        }
        values.remove(&main_key);
        Ok(())
    }

    fn resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<ResumptionPskStore>, Self::Error> {
        self.read(RESUMPTION_PSK_STORE_LABEL, &json(group_id)?)
    }

    fn write_resumption_psk_store<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ResumptionPskStore: traits::ResumptionPskStore<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        resumption_psk_store: &ResumptionPskStore,
    ) -> Result<(), Self::Error> {
        self.write(
            RESUMPTION_PSK_STORE_LABEL,
            &json(group_id)?,
            json(resumption_psk_store)?,
        )
    }

    fn delete_all_resumption_psk_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(RESUMPTION_PSK_STORE_LABEL, &json(group_id)?)
    }

    fn own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<LeafNodeIndex>, Self::Error> {
        self.read(OWN_LEAF_NODE_INDEX_LABEL, &json(group_id)?)
    }

    fn write_own_leaf_index<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNodeIndex: traits::LeafNodeIndex<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        own_leaf_index: &LeafNodeIndex,
    ) -> Result<(), Self::Error> {
        self.write(
            OWN_LEAF_NODE_INDEX_LABEL,
            &json(group_id)?,
            json(own_leaf_index)?,
        )
    }

    fn delete_own_leaf_index<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(OWN_LEAF_NODE_INDEX_LABEL, &json(group_id)?)
    }

    fn group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<GroupEpochSecrets>, Self::Error> {
        self.read(EPOCH_SECRETS_LABEL, &json(group_id)?)
    }

    fn write_group_epoch_secrets<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        GroupEpochSecrets: traits::GroupEpochSecrets<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        group_epoch_secrets: &GroupEpochSecrets,
    ) -> Result<(), Self::Error> {
        self.write(
            EPOCH_SECRETS_LABEL,
            &json(group_id)?,
            json(group_epoch_secrets)?,
        )
    }

    fn delete_group_epoch_secrets<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(EPOCH_SECRETS_LABEL, &json(group_id)?)
    }

    fn write_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
        key_pairs: &[HpkeKeyPair],
    ) -> Result<(), Self::Error> {
        self.write(
            EPOCH_KEY_PAIRS_LABEL,
            &epoch_key_pairs_id(group_id, epoch, leaf_index)?,
            json(key_pairs)?,
        )
    }

    fn encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
        HpkeKeyPair: traits::HpkeKeyPair<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<Vec<HpkeKeyPair>, Self::Error> {
        let key = epoch_key_pairs_id(group_id, epoch, leaf_index)?;
        Ok(self.read(EPOCH_KEY_PAIRS_LABEL, &key)?.unwrap_or_default())
    }

    fn delete_encryption_epoch_key_pairs<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        EpochKey: traits::EpochKey<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        epoch: &EpochKey,
        leaf_index: u32,
    ) -> Result<(), Self::Error> {
        let key = epoch_key_pairs_id(group_id, epoch, leaf_index)?;
        self.delete(EPOCH_KEY_PAIRS_LABEL, &key)
    }

    fn clear_proposal_queue<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        let gid = json(group_id)?;
        let refs: Vec<ProposalRef> = self.read_list(PROPOSAL_QUEUE_REFS_LABEL, &gid)?;
        for proposal_ref in refs {
            self.delete(QUEUED_PROPOSAL_LABEL, &json(&(group_id, proposal_ref))?)?;
        }
        self.delete(PROPOSAL_QUEUE_REFS_LABEL, &gid)
    }

    fn mls_group_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Option<MlsGroupJoinConfig>, Self::Error> {
        self.read(JOIN_CONFIG_LABEL, &json(group_id)?)
    }

    fn write_mls_join_config<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        MlsGroupJoinConfig: traits::MlsGroupJoinConfig<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        config: &MlsGroupJoinConfig,
    ) -> Result<(), Self::Error> {
        self.write(JOIN_CONFIG_LABEL, &json(group_id)?, json(config)?)
    }

    fn own_leaf_nodes<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
    ) -> Result<Vec<LeafNode>, Self::Error> {
        self.read_list(OWN_LEAF_NODES_LABEL, &json(group_id)?)
    }

    fn append_own_leaf_node<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        LeafNode: traits::LeafNode<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        leaf_node: &LeafNode,
    ) -> Result<(), Self::Error> {
        self.append(OWN_LEAF_NODES_LABEL, &json(group_id)?, json(leaf_node)?)
    }

    fn delete_own_leaf_nodes<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(OWN_LEAF_NODES_LABEL, &json(group_id)?)
    }

    fn delete_group_config<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(JOIN_CONFIG_LABEL, &json(group_id)?)
    }

    fn delete_tree<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(TREE_LABEL, &json(group_id)?)
    }

    fn delete_confirmation_tag<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(CONFIRMATION_TAG_LABEL, &json(group_id)?)
    }

    fn delete_context<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(GROUP_CONTEXT_LABEL, &json(group_id)?)
    }

    fn delete_interim_transcript_hash<GroupId: traits::GroupId<CURRENT_VERSION>>(
        &self,
        group_id: &GroupId,
    ) -> Result<(), Self::Error> {
        self.delete(INTERIM_TRANSCRIPT_HASH_LABEL, &json(group_id)?)
    }

    fn remove_proposal<
        GroupId: traits::GroupId<CURRENT_VERSION>,
        ProposalRef: traits::ProposalRef<CURRENT_VERSION>,
    >(
        &self,
        group_id: &GroupId,
        proposal_ref: &ProposalRef,
    ) -> Result<(), Self::Error> {
        self.remove_item(
            PROPOSAL_QUEUE_REFS_LABEL,
            &json(group_id)?,
            json(proposal_ref)?,
        )?;
        self.delete(QUEUED_PROPOSAL_LABEL, &json(&(group_id, proposal_ref))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The message secrets store round-trips through the split records, strings with
    /// brackets and escapes included; rewriting it with only the current epoch changed
    /// leaves the past records out of the transaction; a dropped epoch's record goes.
    #[test]
    fn message_secrets_split_round_trips_and_writes_only_changes() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug, Clone)]
        struct Tree {
            epoch: u64,
            s: String,
            v: Vec<Vec<u8>>,
        }
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug, Clone)]
        struct Store {
            max_epochs: usize,
            past_epoch_trees: Vec<Tree>,
            message_secrets: Vec<u8>,
        }
        impl Entity<CURRENT_VERSION> for Store {}
        impl traits::MessageSecrets<CURRENT_VERSION> for Store {}
        let tree = |e: u64| Tree {
            epoch: e,
            s: format!("a]\\\"}},[{e}"),
            v: vec![vec![1, 2], vec![]],
        };
        let gid = GroupIdT(vec![7, 7]);
        let st = TrackedStorage::default();
        let mut store = Store {
            max_epochs: 3,
            past_epoch_trees: vec![tree(4), tree(5)],
            message_secrets: vec![1],
        };
        st.write_message_secrets(&gid, &store).expect("write");
        let back: Store = st.message_secrets(&gid).expect("read").expect("some");
        assert_eq!(back, store);
        let n_records = |st: &TrackedStorage| st.values.read().expect("lock").iter().count();
        assert_eq!(n_records(&st), 3);
        st.values.write().expect("lock").commit();

        store.message_secrets = vec![2];
        st.write_message_secrets(&gid, &store).expect("write");
        let changed: Vec<Vec<u8>> = st
            .values
            .read()
            .expect("lock")
            .pending_changes()
            .iter()
            .map(|(k, _)| k.to_vec())
            .collect();
        assert_eq!(
            changed,
            vec![storage_key(MESSAGE_SECRETS_LABEL, &json(&gid).expect("j"))]
        );
        st.values.write().expect("lock").commit();

        store.past_epoch_trees = vec![tree(5), tree(6)];
        st.write_message_secrets(&gid, &store).expect("write");
        assert_eq!(n_records(&st), 3);
        let back: Store = st.message_secrets(&gid).expect("read").expect("some");
        assert_eq!(back, store);
        st.delete_message_secrets(&gid).expect("delete");
        assert_eq!(n_records(&st), 0);
        // A store written whole (before the split) still reads.
        st.write(
            MESSAGE_SECRETS_LABEL,
            &json(&gid).expect("j"),
            json(&store).expect("j"),
        )
        .expect("write whole");
        let back: Store = st.message_secrets(&gid).expect("read").expect("some");
        assert_eq!(back, store);
    }

    /// A past tree that counts how often it is written as JSON (text) vs fingerprinted.
    #[derive(serde::Deserialize, PartialEq, Debug, Clone)]
    struct CountedTree {
        epoch: u64,
        v: Vec<u8>,
    }
    std::thread_local! {
        static TEXT_WRITES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    impl serde::Serialize for CountedTree {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeStruct as _;
            if s.is_human_readable() {
                TEXT_WRITES.with(|c| c.set(c.get() + 1));
            }
            let mut st = s.serialize_struct("CountedTree", 2)?;
            st.serialize_field("epoch", &self.epoch)?;
            st.serialize_field("v", &self.v)?;
            st.end()
        }
    }
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug, Clone)]
    struct CountedStore {
        max_epochs: usize,
        past_epoch_trees: std::collections::VecDeque<CountedTree>,
        message_secrets: Vec<u8>,
    }
    impl Entity<CURRENT_VERSION> for CountedStore {}
    impl traits::MessageSecrets<CURRENT_VERSION> for CountedStore {}

    /// Rewriting the store with unchanged past trees formats none of them as JSON (the
    /// whole-store JSON and scan did, for every tree, on every message); a changed tree,
    /// and a record a rollback put back, are written again; the main record is the one
    /// the scan of the whole JSON produces.
    #[test]
    fn unchanged_past_trees_are_not_formatted_again() {
        let gid = GroupIdT(vec![9]);
        let st = TrackedStorage::default();
        let tree = |e: u64, b: u8| CountedTree {
            epoch: e,
            v: vec![b; 40],
        };
        let mut store = CountedStore {
            max_epochs: 4,
            past_epoch_trees: [tree(1, 1), tree(2, 2), tree(3, 3)].into(),
            message_secrets: vec![7],
        };
        let text = || TEXT_WRITES.with(std::cell::Cell::get);
        VERIFY_SPLIT.with(|v| v.set(false));
        st.write_message_secrets(&gid, &store).expect("write");
        st.values.write().expect("lock").commit();
        let main_key = storage_key(MESSAGE_SECRETS_LABEL, &json(&gid).expect("j"));
        let full = json(&store).expect("j");
        let (scanned, _) = split_past(&full).expect("split");
        assert_eq!(
            st.values.read().expect("lock").get(&main_key),
            Some(&scanned)
        );

        let before = text();
        store.message_secrets = vec![8];
        st.write_message_secrets(&gid, &store).expect("write");
        assert_eq!(text() - before, 0, "unchanged past trees formatted again");
        assert_eq!(st.values.read().expect("lock").pending_changes().len(), 1);
        st.values.write().expect("lock").commit();

        let before = text();
        store.past_epoch_trees[1].v[0] = 99;
        st.write_message_secrets(&gid, &store).expect("write");
        assert_eq!(text() - before, 1);
        // Rolled back: the record holds the old tree again, so the next write rewrites it.
        st.rollback();
        st.write_message_secrets(&gid, &store).expect("write");
        let back: CountedStore = st.message_secrets(&gid).expect("read").expect("some");
        assert_eq!(back, store);
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct GroupIdT(Vec<u8>);
    impl Entity<CURRENT_VERSION> for GroupIdT {}
    impl Key<CURRENT_VERSION> for GroupIdT {}
    impl traits::GroupId<CURRENT_VERSION> for GroupIdT {}

    #[test]
    fn key_layout_is_label_key_version() {
        // The layout of openmls_memory_storage: existing stores must stay readable.
        let gid = json(&[1u8, 2]).expect("json");
        assert_eq!(storage_key(TREE_LABEL, &gid), b"Tree[1,2]\x00\x01".to_vec());
    }

    #[test]
    fn unserializable_key_is_a_typed_error_not_an_empty_key() {
        // JSON object keys must be strings; the original built `label || "" || version`.
        let bad: BTreeMap<Vec<u8>, u8> = [(vec![1u8], 1u8)].into_iter().collect();
        assert_eq!(json(&bad), Err(StoreError::SerializationError));
        assert_eq!(
            json(&(1u8, &bad)).map(|k| storage_key(TREE_LABEL, &k)),
            Err(StoreError::SerializationError)
        );
    }

    #[test]
    fn rollback_restores_prior_values_and_absences() {
        let s = TrackedStorage::default();
        s.write(TREE_LABEL, b"g", b"v1".to_vec()).expect("write");
        s.append(OWN_LEAF_NODES_LABEL, b"g", b"1".to_vec())
            .expect("append");
        s.values.write().expect("lock").commit();
        let before: Vec<_> = {
            let m = s.values.read().expect("lock");
            let mut v: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            v.sort();
            v
        };
        s.write(TREE_LABEL, b"g", b"v2".to_vec()).expect("write");
        s.write(TREE_LABEL, b"g", b"v3".to_vec())
            .expect("write again");
        s.write(GROUP_STATE_LABEL, b"g", b"new".to_vec())
            .expect("write new");
        s.append(OWN_LEAF_NODES_LABEL, b"g", b"2".to_vec())
            .expect("append");
        s.delete(TREE_LABEL, b"g").expect("delete");
        {
            let m = s.values.read().expect("lock");
            let changed: Vec<&[u8]> = m.pending_changes().iter().map(|(k, _)| *k).collect();
            assert_eq!(changed.len(), 3);
        }
        s.rollback();
        let m = s.values.read().expect("lock");
        let mut after: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        after.sort();
        assert!(after == before);
        assert!(!m.in_transaction());
    }

    #[test]
    fn rewriting_the_prior_value_is_no_change() {
        let s = TrackedStorage::default();
        s.write(TREE_LABEL, b"g", b"v1".to_vec()).expect("write");
        s.values.write().expect("lock").commit();
        s.write(TREE_LABEL, b"g", b"v2".to_vec()).expect("write");
        s.write(TREE_LABEL, b"g", b"v1".to_vec())
            .expect("write back");
        assert!(s.values.read().expect("lock").pending_changes().is_empty());
    }
}
