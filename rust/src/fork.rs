//! Stage B of issue 14 (groups on a partitioned mesh): group-scoped snapshots of the MLS
//! state, rollback to them, read-only use of a retained snapshot, and rejoin by external
//! commit.
//!
//! Why snapshots live in the store and not in memory: `MlsGroup` is not `Clone` outside
//! OpenMLS's test-utils, and a fork can be detected long after the epoch it started in (a
//! partition heals hours later, the process restarted meanwhile). So a snapshot is a copy
//! of every storage record of one group, kept as one more record of the encrypted log: it
//! is durable, written atomically with the operation that takes it, and rolling back is
//! one transaction (`run_tx`) that rewrites the group's records: a crash in the middle
//! leaves the log with or without that record, never half of it.
//!
//! A child module of `mls` (it reads `State`'s private fields); its Python methods are a
//! second `#[pymethods]` block per class (pyo3 `multiple-pymethods`).

use std::collections::HashSet;

use super::*;
use crate::tracked_storage::{group_key_part, is_group_record, StoreError};

/// Snapshots kept per group at most. Why a cap: a caller that forgets `release` must not
/// grow the store (and every compaction) without bound; the fork resolver needs one per
/// epoch of its rollback window plus the retained losing heads, far below this.
pub const MAX_SNAPSHOTS: usize = 64;

const SNAP_PREFIX: &[u8] = b"qpc/snap/";
const SNAP_SEQ_KEY: &[u8] = b"qpc/snapseq";
const SNAP_VERSION: u8 = 1;

/// A decoded snapshot: the group's epoch when taken and its records, sorted by key.
struct Snapshot {
    epoch: u64,
    records: Vec<(Vec<u8>, Vec<u8>)>,
}

fn store_err(e: StoreError) -> Error {
    Error::from_dbg(Kind::Storage, "storage", e)
}

/// `qpc/snap/ | len(gid) u8 | gid`: every snapshot of one group, and nothing of another
/// (the length byte keeps a group id from being a prefix of a longer one).
fn snap_group_prefix(gid: &[u8]) -> Vec<u8> {
    let mut k = SNAP_PREFIX.to_vec();
    // Group ids are 1..=255 bytes (op_create_group; MLS caps them at 255 on the wire too).
    k.push(u8::try_from(gid.len()).unwrap_or(u8::MAX));
    k.extend_from_slice(gid);
    k
}

fn snap_key(gid: &[u8], id: u64) -> Vec<u8> {
    let mut k = snap_group_prefix(gid);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// version u8 | epoch u64 LE | count u32 LE | count * (klen u32 | key | vlen u32 | value).
fn encode_snapshot(epoch: u64, records: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<u8>> {
    let len32 = |n: usize| {
        u32::try_from(n).map_err(|_| Error::new(Kind::Storage, "snapshot record too large"))
    };
    let size: usize = records.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(13 + size);
    out.push(SNAP_VERSION);
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&len32(records.len())?.to_le_bytes());
    for (k, v) in records {
        out.extend_from_slice(&len32(k.len())?.to_le_bytes());
        out.extend_from_slice(k);
        out.extend_from_slice(&len32(v.len())?.to_le_bytes());
        out.extend_from_slice(v);
    }
    Ok(out)
}

fn snapshot_epoch(buf: &[u8]) -> Option<u64> {
    if buf.first() != Some(&SNAP_VERSION) {
        return None;
    }
    Some(u64::from_le_bytes(buf.get(1..9)?.try_into().ok()?))
}

fn decode_snapshot(buf: &[u8]) -> Result<Snapshot> {
    fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Option<&'a [u8]> {
        let s = buf.get(*pos..pos.checked_add(n)?)?;
        *pos += n;
        Some(s)
    }
    fn take_u32(buf: &[u8], pos: &mut usize) -> Option<usize> {
        Some(u32::from_le_bytes(take(buf, pos, 4)?.try_into().ok()?) as usize)
    }
    let parse = || -> Option<Snapshot> {
        let epoch = snapshot_epoch(buf)?;
        let mut pos = 9;
        let n = take_u32(buf, &mut pos)?;
        let mut records = Vec::with_capacity(n.min(buf.len() / 8));
        for _ in 0..n {
            let kl = take_u32(buf, &mut pos)?;
            let k = take(buf, &mut pos, kl)?.to_vec();
            let vl = take_u32(buf, &mut pos)?;
            let v = take(buf, &mut pos, vl)?.to_vec();
            records.push((k, v));
        }
        (pos == buf.len()).then_some(Snapshot { epoch, records })
    };
    parse().ok_or_else(|| Error::new(Kind::Storage, "corrupt group snapshot record"))
}

fn unknown_snapshot(gid: &[u8], id: u64) -> Error {
    Error::new(
        Kind::UnknownSnapshot,
        format!("no snapshot {id} of group {}", hex(gid)),
    )
}

impl State {
    /// Every record of the group (the OpenMLS ones and our group index entry), sorted.
    fn group_records(&self, gid: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let gj = group_key_part(gid).map_err(store_err)?;
        let ik = index_key(gid);
        let m = self
            .provider
            .storage
            .values
            .read()
            .map_err(|_| poisoned())?;
        let mut v: Vec<(Vec<u8>, Vec<u8>)> = m
            .iter()
            .filter(|(k, _)| **k == ik || is_group_record(k, &gj))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// (gwire) Every HPKE encryption key pair record of the identity.
    fn encryption_key_records(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let m = self
            .provider
            .storage
            .values
            .read()
            .map_err(|_| poisoned())?;
        Ok(m.iter()
            .filter(|(k, _)| k.starts_with(b"EncryptionKeyPair"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    /// (id, epoch, stored bytes) of every snapshot of the group, oldest first.
    fn snapshot_list(&self, gid: &[u8]) -> Result<Vec<(u64, u64, u64)>> {
        let prefix = snap_group_prefix(gid);
        let m = self
            .provider
            .storage
            .values
            .read()
            .map_err(|_| poisoned())?;
        let mut out = Vec::new();
        for (k, v) in m.iter() {
            let Some(rest) = k.strip_prefix(prefix.as_slice()) else {
                continue;
            };
            let (Ok(id), Some(epoch)) = (<[u8; 8]>::try_from(rest), snapshot_epoch(v)) else {
                return Err(Error::new(Kind::Storage, "corrupt group snapshot record"));
            };
            out.push((u64::from_be_bytes(id), epoch, (k.len() + v.len()) as u64));
        }
        out.sort_unstable();
        Ok(out)
    }

    fn load_snapshot(&self, gid: &[u8], id: u64) -> Result<Snapshot> {
        let m = self
            .provider
            .storage
            .values
            .read()
            .map_err(|_| poisoned())?;
        let raw = m
            .get(&snap_key(gid, id))
            .ok_or_else(|| unknown_snapshot(gid, id))?;
        decode_snapshot(raw)
    }

    /// Copy every record of the group into a new snapshot; returns its id (unique per
    /// identity, increasing, never reused).
    pub fn op_snapshot(&mut self, gid: &[u8]) -> Result<u64> {
        let epoch = self.group_view(gid)?.epoch().as_u64();
        if self.snapshot_list(gid)?.len() >= MAX_SNAPSHOTS {
            return Err(Error::new(
                Kind::SnapshotLimit,
                format!(
                    "group {} already has {MAX_SNAPSHOTS} snapshots: release some first",
                    hex(gid)
                ),
            ));
        }
        let mut records = self.group_records(gid)?;
        // --- gwire: our leaf's HPKE private keys are identity-scoped records (keyed by
        // public key), and a merge that replaces our leaf (a commit applying our own
        // Update proposal) deletes the old one: without it, a sibling commit staged after a
        // rollback fails with MissingDecryptionKey. The snapshot keeps every encryption key
        // pair, and a rollback puts back the missing ones (it never deletes any: keys made
        // since, e.g. for new KeyPackages, stay).
        records.extend(self.encryption_key_records()?);
        let last = {
            let m = self
                .provider
                .storage
                .values
                .read()
                .map_err(|_| poisoned())?;
            match m.get(SNAP_SEQ_KEY) {
                Some(b) => u64::from_le_bytes(
                    b.as_slice()
                        .try_into()
                        .map_err(|_| Error::new(Kind::Storage, "corrupt snapshot counter"))?,
                ),
                None => 0,
            }
        };
        let id = last + 1;
        self.storage_put(SNAP_SEQ_KEY.to_vec(), id.to_le_bytes().to_vec())?;
        self.storage_put(snap_key(gid, id), encode_snapshot(epoch, &records)?)?;
        Ok(id)
    }

    /// Make the group's records exactly those of snapshot `id` (records the group gained
    /// since are deleted); returns the restored epoch. Other groups, identity records and
    /// every snapshot (this one too) are left alone.
    pub fn op_rollback(&mut self, gid: &[u8], id: u64) -> Result<u64> {
        let snap = self.load_snapshot(gid, id)?;
        let current = self.group_records(gid)?;
        // The cached MlsGroup describes the state we leave: drop it (reloaded on next use),
        // also when the transaction fails (touch).
        self.touch(gid);
        self.groups.remove(gid);
        let keep: HashSet<&[u8]> = snap.records.iter().map(|(k, _)| k.as_slice()).collect();
        let mut m = self
            .provider
            .storage
            .values
            .write()
            .map_err(|_| poisoned())?;
        for (k, _) in &current {
            if !keep.contains(k.as_slice()) {
                m.remove(k);
            }
        }
        for (k, v) in snap.records {
            m.insert(k, v);
        }
        Ok(snap.epoch)
    }

    /// Delete snapshot `id` (UnknownSnapshot if there is none).
    pub fn op_release(&mut self, gid: &[u8], id: u64) -> Result<()> {
        let key = snap_key(gid, id);
        let mut m = self
            .provider
            .storage
            .values
            .write()
            .map_err(|_| poisoned())?;
        if m.get(&key).is_none() {
            return Err(unknown_snapshot(gid, id));
        }
        m.remove(&key);
        Ok(())
    }

    /// (id, epoch) of the group's snapshots, oldest first.
    pub fn op_snapshots(&self, gid: &[u8]) -> Result<Vec<(u64, u64)>> {
        Ok(self
            .snapshot_list(gid)?
            .into_iter()
            .map(|(id, epoch, _)| (id, epoch))
            .collect())
    }

    /// Bytes the group's snapshots occupy in the store (keys and values, before encryption).
    pub fn op_snapshot_bytes(&self, gid: &[u8]) -> Result<u64> {
        Ok(self.snapshot_list(gid)?.iter().map(|s| s.2).sum())
    }
}

/// Run `f` on the state and then undo everything it changed, in memory (records and
/// cached groups) as on disk (nothing reaches the log): the read-only twin of `run_tx`.
///
/// Why this instead of a separate read-only code path: `op_process` already knows how to
/// turn every kind of message into an event (with its typed errors); running it on the
/// real state and discarding the effect gives exactly its answer and cannot drift from it.
pub fn run_discarded<T>(st: &mut State, f: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
    debug_assert!(st.touched.is_empty());
    let r = catch_unwind(AssertUnwindSafe(|| f(st))).unwrap_or_else(|_| {
        Err(Error::new(
            Kind::Mls,
            "internal error in the MLS library (the operation was undone)",
        ))
    });
    st.rollback();
    r
}

/// `run_discarded` on the shared identity state, without the GIL.
fn run_readonly<T: Send>(
    py: Python<'_>,
    shared: &Shared,
    f: impl FnOnce(&mut State) -> Result<T> + Send,
) -> PyResult<T> {
    with_state(py, shared, |st| run_discarded(st, f))
}

impl State {
    /// Drop our records of the group (not its snapshots), before joining it again (by
    /// external commit, or by a Welcome of a branch we were not on): left in place,
    /// records of the old membership (past epochs' key pairs, queued proposals) would mix
    /// with the new ones. Part of the caller's transaction.
    pub(crate) fn drop_group_records(&mut self, gid: &[u8]) -> Result<()> {
        self.touch(gid);
        self.groups.remove(gid);
        let old = self.group_records(gid)?;
        let mut m = self
            .provider
            .storage
            .values
            .write()
            .map_err(|_| poisoned())?;
        for (k, _) in &old {
            m.remove(k);
        }
        Ok(())
    }

    /// A signed GroupInfo of the current epoch, with the ratchet tree and the external
    /// public key: what a member needs to rejoin by external commit.
    pub fn op_group_info(&mut self, gid: &[u8]) -> Result<Vec<u8>> {
        self.ensure_loaded(gid)?;
        let g = self.groups.get(gid).ok_or_else(|| unknown_group(gid))?;
        if !g.is_active() {
            return Err(Error::new(
                Kind::NotAMember,
                "we are no longer a member of this group",
            ));
        }
        let m = g
            .export_group_info(&self.provider.crypto, &self.signer, true)
            .map_err(|e| Error::from_dbg(Kind::Mls, "export GroupInfo", e))?;
        msg_bytes(&m)
    }

    /// Join (or rejoin) the group a GroupInfo describes by an external commit; returns the
    /// group id and the commit to send to its members. Our state of that group, if any
    /// (stale, or removed), is replaced: keep a snapshot first if it is still needed. An
    /// old leaf with our signature key is removed by the same commit (a resync).
    pub fn op_join_external(&mut self, group_info: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        let msg = MlsMessageIn::tls_deserialize_exact(group_info)
            .map_err(|e| Error::from_dbg(Kind::InvalidMessage, "malformed GroupInfo", e))?;
        let MlsMessageBodyIn::GroupInfo(vgi) = msg.extract() else {
            return Err(Error::new(
                Kind::InvalidMessage,
                "message is not a GroupInfo",
            ));
        };
        let gid = vgi.group_id().as_slice().to_vec();
        if gid.is_empty() || gid.len() > 255 {
            return Err(Error::new(
                Kind::InvalidMessage,
                "group id must be 1..255 bytes",
            ));
        }
        self.drop_group_records(&gid)?;
        let params = LeafNodeParameters::builder()
            .with_capabilities(leaf_capabilities())
            .build();
        let (g, bundle) = MlsGroup::external_commit_builder()
            .with_config(join_config())
            .build_group(&self.provider, vgi, self.credential.clone())
            .map_err(|e| match e {
                ExternalCommitBuilderError::StorageError(_)
                | ExternalCommitBuilderError::LibraryError(_) => {
                    Error::from_dbg(Kind::Mls, "external commit", e)
                }
                _ => Error::from_dbg(Kind::InvalidMessage, "unusable GroupInfo", e),
            })?
            .leaf_node_parameters(params)
            .load_psks(self.provider.storage())
            .map_err(|e| Error::from_dbg(Kind::Mls, "external commit PSKs", e))?
            .build(
                self.provider.rand(),
                self.provider.crypto(),
                &self.signer,
                |_| true,
            )
            .map_err(|e| Error::from_dbg(Kind::InvalidMessage, "build external commit", e))?
            .finalize(&self.provider)
            .map_err(|e| Error::from_dbg(Kind::Mls, "finalize external commit", e))?;
        let (commit, _, _) = bundle.into_contents();
        self.storage_put(index_key(&gid), Vec::new())?;
        self.groups.insert(gid.clone(), g);
        Ok((gid, msg_bytes(&commit)?))
    }
}

// ---------------------------------------------------------------------------------

#[pymethods]
impl Identity {
    /// Copy the group's whole MLS state (tree, secrets of the current and kept past epochs,
    /// proposal store, own leaf keys, a pending commit) into a durable snapshot; returns
    /// its id. SnapshotLimit when the group has MAX_SNAPSHOTS already.
    fn snapshot(&self, py: Python<'_>, group_id: &[u8]) -> PyResult<u64> {
        run(py, &self.shared, |st| st.op_snapshot(group_id))
    }

    /// Put the group back exactly into the state of snapshot `snapshot` (one atomic write:
    /// a crash leaves the old or the new state); returns the restored epoch. The snapshot
    /// stays (release it when no longer needed). UnknownSnapshot if absent.
    fn rollback(&self, py: Python<'_>, group_id: &[u8], snapshot: u64) -> PyResult<u64> {
        run(py, &self.shared, |st| st.op_rollback(group_id, snapshot))
    }

    /// Delete a snapshot; UnknownSnapshot if absent.
    fn release(&self, py: Python<'_>, group_id: &[u8], snapshot: u64) -> PyResult<()> {
        run(py, &self.shared, |st| st.op_release(group_id, snapshot))
    }

    /// (snapshot id, epoch) of the group's snapshots, oldest first.
    fn snapshots(&self, py: Python<'_>, group_id: &[u8]) -> PyResult<Vec<(u64, u64)>> {
        run(py, &self.shared, |st| st.op_snapshots(group_id))
    }

    /// Bytes the group's snapshots hold (plaintext size in the store).
    fn snapshot_bytes(&self, py: Python<'_>, group_id: &[u8]) -> PyResult<u64> {
        run(py, &self.shared, |st| st.op_snapshot_bytes(group_id))
    }
}

#[pymethods]
impl Group {
    /// Process a message and report it as `process` would, then undo everything: the group
    /// is left exactly as before (nothing is persisted). For a commit this is "stage without
    /// merge": its sender, epoch and facts are known before deciding to apply it with
    /// `process`. Errors are those of `process`.
    fn preview(&self, py: Python<'_>, message: &[u8]) -> PyResult<Event> {
        let gid = &self.gid;
        let p = run_readonly(py, &self.shared, |st| st.op_process(gid, message))?;
        Ok(Event::new(py, p))
    }

    /// A signed GroupInfo of the current epoch with the ratchet tree and the external public
    /// key, for `Identity.join_external`. NotAMember once we were removed.
    fn group_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let gid = &self.gid;
        let out = run(py, &self.shared, |st| st.op_group_info(gid))?;
        Ok(PyBytes::new(py, &out))
    }
}

#[pymethods]
impl Identity {
    /// Decrypt a message with the state of snapshot `snapshot` (e.g. the retained head of
    /// a losing branch) WITHOUT persisting anything: the live group and the snapshot are
    /// left as they were, so a late message of that branch decrypts whenever it arrives.
    /// A commit is reported (sender, epoch after it) but applied nowhere.
    fn process_readonly(
        &self,
        py: Python<'_>,
        group_id: &[u8],
        snapshot: u64,
        message: &[u8],
    ) -> PyResult<Event> {
        let p = run_readonly(py, &self.shared, |st| {
            st.op_rollback(group_id, snapshot)?;
            st.op_process(group_id, message)
        })?;
        Ok(Event::new(py, p))
    }

    /// Join (or rejoin) a group by external commit from its GroupInfo: returns the group
    /// (already on the new epoch) and the commit to send to the members, who `process` it
    /// as a commit. Our old state of the group is replaced (snapshots stay); an old leaf of
    /// ours is removed by the commit itself.
    fn join_external<'py>(
        &self,
        py: Python<'py>,
        group_info: &[u8],
    ) -> PyResult<(Group, Bound<'py, PyBytes>)> {
        let (gid, commit) = run(py, &self.shared, |st| st.op_join_external(group_info))?;
        Ok((new_group(&self.shared, gid), PyBytes::new(py, &commit)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TmpDir;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn new_state(tmp: &TmpDir, name: &str) -> State {
        State::create(&tmp.path().join(name), SECRET, false).expect("create identity")
    }

    fn records(st: &State) -> Vec<(Vec<u8>, Vec<u8>)> {
        let m = st.provider.storage.values.read().expect("lock");
        let mut v: Vec<_> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort();
        v
    }

    fn without_snapshots(v: Vec<(Vec<u8>, Vec<u8>)>) -> Vec<(Vec<u8>, Vec<u8>)> {
        v.into_iter()
            .filter(|(k, _)| !k.starts_with(SNAP_PREFIX) && k.as_slice() != SNAP_SEQ_KEY)
            .collect()
    }

    fn epoch(st: &mut State, gid: &[u8]) -> u64 {
        run_tx(st, |st| Ok(st.group_view(gid)?.epoch().as_u64())).expect("epoch")
    }

    /// `members[0]` creates group `name` and adds the others with one merged commit.
    fn group_of(members: &mut [&mut State], name: &[u8]) -> Vec<u8> {
        let kps: Vec<Vec<u8>> = members[1..]
            .iter_mut()
            .map(|m| run_tx(m, |st| st.op_key_package(false)).expect("key package"))
            .collect();
        let gid = run_tx(members[0], |st| st.op_create_group(Some(name.to_vec()))).expect("grp");
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

    /// `from` commits a self-update, merges it, `to` processes it.
    fn update(from: &mut State, to: &mut State, gid: &[u8]) -> Vec<u8> {
        let c = run_tx(from, |st| {
            let c = st.op_update(gid)?;
            st.op_merge_pending_commit(gid)?;
            Ok(c)
        })
        .expect("update");
        run_tx(to, |st| st.op_process(gid, &c)).expect("process commit");
        c
    }

    fn talk(from: &mut State, to: &mut State, gid: &[u8], text: &[u8]) {
        let ct = run_tx(from, |st| st.op_encrypt(gid, text)).expect("encrypt");
        let got = run_tx(to, |st| st.op_process(gid, &ct)).expect("process");
        assert_eq!(got.data.as_slice(), text);
    }

    /// The snapshot holds exactly the group's records: rolling one group back restores
    /// every record of it (the epoch key pairs of the old epoch included, which OpenMLS
    /// deleted on merge) and leaves another group and the identity's records alone.
    #[test]
    fn rollback_restores_one_group_exactly() {
        let tmp = TmpDir::new("fork-scope");
        let (mut a, mut b) = (new_state(&tmp, "a"), new_state(&tmp, "b"));
        let g1 = group_of(&mut [&mut a, &mut b], b"one");
        let g2 = group_of(&mut [&mut a, &mut b], b"two");
        let before = records(&b);
        let snap = run_tx(&mut b, |st| st.op_snapshot(&g1)).expect("snapshot");
        assert_eq!(
            run_tx(&mut b, |st| st.op_snapshots(&g1)).expect("list"),
            vec![(snap, 1)]
        );
        assert!(run_tx(&mut b, |st| st.op_snapshots(&g2))
            .expect("list")
            .is_empty());
        update(&mut a, &mut b, &g1);
        update(&mut a, &mut b, &g2);
        talk(&mut a, &mut b, &g1, b"epoch 2");
        let kp = run_tx(&mut b, |st| st.op_key_package(false)).expect("kp");
        assert!(!kp.is_empty());
        assert_eq!(epoch(&mut b, &g1), 2);
        let g2_after: Vec<_> = {
            let gj = group_key_part(&g2).expect("gid");
            records(&b)
                .into_iter()
                .filter(|(k, _)| is_group_record(k, &gj))
                .collect()
        };

        assert_eq!(
            run_tx(&mut b, |st| st.op_rollback(&g1, snap)).expect("rb"),
            1
        );
        assert_eq!(epoch(&mut b, &g1), 1);
        let gj1 = group_key_part(&g1).expect("gid");
        let gj2 = group_key_part(&g2).expect("gid");
        let now = without_snapshots(records(&b));
        let g1_now: Vec<_> = now
            .iter()
            .filter(|(k, _)| is_group_record(k, &gj1))
            .collect();
        let g1_before: Vec<_> = before
            .iter()
            .filter(|(k, _)| is_group_record(k, &gj1))
            .collect();
        assert!(g1_now == g1_before, "group one differs from its snapshot");
        assert!(
            g1_now.iter().any(|(k, _)| k.starts_with(b"EpochKeyPairs")),
            "the epoch key pairs are part of the group's records"
        );
        let g2_now: Vec<_> = now
            .into_iter()
            .filter(|(k, _)| is_group_record(k, &gj2))
            .collect();
        assert!(g2_now == g2_after, "the other group changed");
        // The new KeyPackage (identity record) survived the rollback.
        assert!(records(&b)
            .iter()
            .any(|(k, _)| k.starts_with(b"KeyPackage")));
    }

    /// After a rollback to epoch n, a different commit for epoch n (the sibling from the
    /// other side of a partition) processes and merges, and the group works on it.
    #[test]
    fn sibling_commit_merges_after_rollback() {
        let tmp = TmpDir::new("fork-sibling");
        let (mut a, mut b, mut c) = (
            new_state(&tmp, "a"),
            new_state(&tmp, "b"),
            new_state(&tmp, "c"),
        );
        let gid = group_of(&mut [&mut a, &mut b, &mut c], b"chat");
        let snap = run_tx(&mut b, |st| st.op_snapshot(&gid)).expect("snapshot");
        // Partition: a commits on one side (b follows), c on the other.
        update(&mut a, &mut b, &gid);
        talk(&mut a, &mut b, &gid, b"side a");
        let c_commit = run_tx(&mut c, |st| {
            let x = st.op_update(&gid)?;
            st.op_merge_pending_commit(&gid)?;
            Ok(x)
        })
        .expect("c update");
        // b is on a's epoch 2: c's commit for epoch 1 is refused there.
        let err = run_tx(&mut b, |st| st.op_process(&gid, &c_commit)).expect_err("wrong epoch");
        assert_eq!(err.kind, Kind::WrongEpoch);
        // c's branch wins: roll back and apply it.
        run_tx(&mut b, |st| st.op_rollback(&gid, snap)).expect("rollback");
        let got = run_tx(&mut b, |st| st.op_process(&gid, &c_commit)).expect("sibling");
        assert_eq!((got.kind, got.epoch), ("commit", 2));
        talk(&mut c, &mut b, &gid, b"on c's branch");
        talk(&mut b, &mut c, &gid, b"and back");
        // Survives a reopen (the rollback and the snapshot are durable).
        let mem = records(&b);
        drop(b);
        let b2 = State::open(&tmp.path().join("b"), SECRET, false).expect("reopen");
        assert!(records(&b2) == mem);
    }

    /// A failure or panic after the rollback rewrote the records undoes all of it; a crash
    /// that tears the rollback's log record leaves the state from before it, a complete
    /// record the state after it: never a mix.
    #[test]
    fn crash_mid_rollback_leaves_old_or_new_state() {
        let tmp = TmpDir::new("fork-crash");
        let (mut a, mut b) = (new_state(&tmp, "a"), new_state(&tmp, "b"));
        let gid = group_of(&mut [&mut a, &mut b], b"chat");
        let snap = run_tx(&mut b, |st| st.op_snapshot(&gid)).expect("snapshot");
        update(&mut a, &mut b, &gid);
        talk(&mut a, &mut b, &gid, b"epoch 2");
        let old = records(&b);
        let store = tmp.path().join("b").join(crate::persist::STORE_FILE);
        let disk = std::fs::read(&store).expect("read");

        let r: Result<()> = run_tx(&mut b, |st| {
            st.op_rollback(&gid, snap)?;
            Err(Error::new(Kind::Mls, "injected failure"))
        });
        assert!(r.is_err());
        assert!(records(&b) == old);
        let r: Result<()> = run_tx(&mut b, |st| {
            st.op_rollback(&gid, snap)?;
            panic!("injected panic mid-rollback");
        });
        assert!(r.is_err());
        assert!(records(&b) == old && std::fs::read(&store).expect("read") == disk);
        assert_eq!(epoch(&mut b, &gid), 2);
        talk(&mut a, &mut b, &gid, b"still epoch 2");

        let old = records(&b);
        let before_len = std::fs::metadata(&store).expect("stat").len();
        run_tx(&mut b, |st| st.op_rollback(&gid, snap)).expect("rollback");
        let new = records(&b);
        assert!(new != old);
        let full = std::fs::read(&store).expect("read");
        assert!(
            full.len() as u64 > before_len + 8,
            "the rollback was one appended record"
        );
        drop(b);
        for (name, cut, want) in [
            ("torn", (before_len as usize + full.len()) / 2, &old),
            ("whole", full.len(), &new),
        ] {
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join(crate::persist::STORE_FILE), &full[..cut]).expect("write");
            let mut st = State::open(&dir, SECRET, false).expect("reopen");
            assert!(
                &records(&st) == want,
                "{name}: state is neither old nor new"
            );
            let e = epoch(&mut st, &gid);
            assert_eq!(e, if name == "torn" { 2 } else { 1 });
        }
    }

    /// Every record in the store is either the identity's own (KeyPackages and their keys,
    /// signature keys, PSKs, our qpc/ records) or a record of a group that a snapshot
    /// takes: a new kind of group record (e.g. the per-epoch message secrets split out of
    /// the main record) that the scoping does not know fails here, instead of silently
    /// staying out of snapshots and surviving rollbacks.
    #[test]
    fn every_record_is_identity_or_group_scoped() {
        let tmp = TmpDir::new("fork-all-scoped");
        let (mut a, mut b, mut c) = (
            new_state(&tmp, "a"),
            new_state(&tmp, "b"),
            new_state(&tmp, "c"),
        );
        let gid = group_of(&mut [&mut a, &mut b, &mut c], b"chat");
        for _ in 0..3 {
            update(&mut a, &mut b, &gid);
            talk(&mut a, &mut b, &gid, b"x");
            talk(&mut b, &mut a, &gid, b"y");
        }
        let prop = run_tx(&mut a, |st| st.op_propose_update(&gid)).expect("propose");
        run_tx(&mut b, |st| st.op_process(&gid, &prop.0)).expect("queue");
        run_tx(&mut b, |st| st.op_key_package(false)).expect("kp");
        run_tx(&mut b, |st| st.op_snapshot(&gid)).expect("snap");
        let gj = group_key_part(&gid).expect("gid");
        let identity: &[&[u8]] = &[
            b"KeyPackage",
            b"EncryptionKeyPair",
            b"SignatureKeyPair",
            b"Psk",
            b"qpc/",
        ];
        let labels = |k: &[u8]| String::from_utf8_lossy(&k[..k.len().min(24)]).into_owned();
        let mut seen = std::collections::BTreeSet::new();
        for (k, _) in records(&b) {
            let ok = is_group_record(&k, &gj) || identity.iter().any(|p| k.starts_with(p));
            assert!(ok, "record outside any scope: {}", labels(&k));
            if is_group_record(&k, &gj) {
                seen.insert(labels(&k).split(['{', '[']).next().unwrap_or("").to_owned());
            }
        }
        for want in [
            "MessageSecretsPast",
            "QueuedProposal",
            "EpochKeyPairs",
            "Tree",
        ] {
            assert!(seen.contains(want), "no {want} record among {seen:?}");
        }
    }

    #[test]
    fn release_limits_and_unknown_snapshots_are_typed() {
        let tmp = TmpDir::new("fork-limits");
        let mut a = new_state(&tmp, "a");
        let gid = run_tx(&mut a, |st| st.op_create_group(Some(b"g".to_vec()))).expect("grp");
        let err = run_tx(&mut a, |st| st.op_rollback(&gid, 7)).expect_err("unknown");
        assert_eq!(err.kind, Kind::UnknownSnapshot);
        let err = run_tx(&mut a, |st| st.op_snapshot(b"nope")).expect_err("no group");
        assert_eq!(err.kind, Kind::UnknownGroup);
        let ids: Vec<u64> = (0..MAX_SNAPSHOTS)
            .map(|_| run_tx(&mut a, |st| st.op_snapshot(&gid)).expect("snap"))
            .collect();
        let err = run_tx(&mut a, |st| st.op_snapshot(&gid)).expect_err("limit");
        assert_eq!(err.kind, Kind::SnapshotLimit);
        let bytes = run_tx(&mut a, |st| st.op_snapshot_bytes(&gid)).expect("bytes");
        assert!(bytes > 0);
        run_tx(&mut a, |st| st.op_release(&gid, ids[0])).expect("release");
        let err = run_tx(&mut a, |st| st.op_release(&gid, ids[0])).expect_err("twice");
        assert_eq!(err.kind, Kind::UnknownSnapshot);
        let again = run_tx(&mut a, |st| st.op_snapshot(&gid)).expect("snap");
        assert!(again > ids[MAX_SNAPSHOTS - 1], "ids are never reused");
        assert!(run_tx(&mut a, |st| st.op_snapshot_bytes(&gid)).expect("bytes") == bytes);
        for id in ids[1..].iter().chain([&again]) {
            run_tx(&mut a, |st| st.op_release(&gid, *id)).expect("release");
        }
        assert_eq!(
            run_tx(&mut a, |st| st.op_snapshot_bytes(&gid)).expect("b"),
            0
        );
    }

    #[test]
    fn corrupt_snapshot_record_is_a_storage_error() {
        for bad in [
            &b""[..],
            &[2u8, 0, 0][..],
            &[1u8, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0][..],
        ] {
            assert_eq!(
                decode_snapshot(bad).err().map(|e| e.kind),
                Some(Kind::Storage)
            );
        }
        let ok = encode_snapshot(3, &[(b"k".to_vec(), b"v".to_vec())]).expect("enc");
        let snap = decode_snapshot(&ok).expect("dec");
        assert_eq!((snap.epoch, snap.records.len()), (3, 1));
        let mut long = ok.clone();
        long.push(0);
        assert!(decode_snapshot(&long).is_err());
    }
}
