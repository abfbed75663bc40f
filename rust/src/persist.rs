//! Encrypted, crash-safe, append-only store for one identity's MLS state.
//!
//! Why a log and not one file per group: one MLS operation touches several records at
//! once (a commit rewrites the tree, the context, the secrets and deletes old HPKE keys
//! that live outside the group). A record per operation, appended and fsynced, makes the
//! whole operation atomic: either the record is complete and authentic, or it is a torn
//! tail that is cut off at the next open. An encrypt only appends the few records it
//! touched (the message secrets), so routers on flash do not rewrite the world per
//! message. When the log grows past a multiple of the live state it is compacted into a
//! fresh snapshot with the classic tmp + fsync + rename + fsync(dir) dance.
//!
//! File layout (`store.qpc`):
//!   header: MAGIC(8) | salt(32) | generation(u64 LE) | check nonce(24) | check ct(32)
//!   record: len(u32 LE) | nonce(24) | ciphertext(len - 24)
//! Key = HKDF-SHA256(ikm = secret, salt, info = "qpc mls store v1"). XChaCha20-Poly1305
//! with random nonces; the AAD binds magic, salt, generation and the record's sequence
//! number, so records cannot be reordered, dropped from the middle or spliced between
//! files. The check block lets a wrong secret be told apart from corruption *before*
//! anything is written.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use openmls_rust_crypto::RustCrypto;
use openmls_traits::random::OpenMlsRand;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::error::{Error, Kind};
use crate::tracked_storage::TrackedMap;

const MAGIC: &[u8; 8] = b"QPCMLS01";
const SALT_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const CHECK_PLAIN: &[u8; 16] = b"qpc-store-check!";
const HEADER_LEN: usize = 8 + SALT_LEN + 8 + NONCE_LEN + CHECK_PLAIN.len() + TAG_LEN;
/// Largest single record we accept when reading (guards allocation on corrupt lengths).
const MAX_RECORD: u32 = 256 * 1024 * 1024;
/// Compact when the log exceeds this multiple of the last snapshot (plus a floor).
const COMPACT_RATIO: u64 = 4;
const COMPACT_FLOOR: u64 = 256 * 1024;

pub const STORE_FILE: &str = "store.qpc";
const TMP_FILE: &str = "store.qpc.tmp";

const PUT: u8 = 1;
const DEL: u8 = 0;

/// Write statistics, exposed to Python so tests and benches can count flash writes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub bytes_written: u64,
    pub records: u64,
    pub compactions: u64,
    pub fsyncs: u64,
}

pub struct Log {
    dir: PathBuf,
    file: File,
    cipher: XChaCha20Poly1305,
    salt: [u8; SALT_LEN],
    generation: u64,
    seq: u64,
    size: u64,
    snapshot_size: u64,
    durable: bool,
    /// A compaction's rename happened but fsync(dir) failed: retried before the next write.
    dir_sync_pending: bool,
    pub stats: Stats,
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::new(Kind::Storage, format!("{what}: {e}"))
}

fn derive_cipher(secret: &[u8], salt: &[u8]) -> Result<XChaCha20Poly1305, Error> {
    if secret.len() < 16 {
        return Err(Error::new(
            Kind::Argument,
            "secret must be at least 16 bytes of key material",
        ));
    }
    let hk = Hkdf::<Sha256>::new(Some(salt), secret);
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand(b"qpc mls store v1", okm.as_mut())
        .map_err(|_| Error::new(Kind::Storage, "hkdf expand failed"))?;
    XChaCha20Poly1305::new_from_slice(okm.as_ref())
        .map_err(|_| Error::new(Kind::Storage, "bad key length"))
}

fn header_prefix(salt: &[u8], generation: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + SALT_LEN + 8);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(salt);
    v.extend_from_slice(&generation.to_le_bytes());
    v
}

fn record_aad(salt: &[u8], generation: u64, seq: u64) -> Vec<u8> {
    let mut v = header_prefix(salt, generation);
    v.extend_from_slice(&seq.to_le_bytes());
    v
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    let d = File::open(dir).map_err(|e| io_err("open state dir", e))?;
    d.sync_all().map_err(|e| io_err("fsync state dir", e))
}

/// Length of the serialization of a batch of changes (`encode_changes_into`).
fn encoded_len<'a, I>(changes: I) -> usize
where
    I: IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
{
    changes
        .into_iter()
        .map(|(k, v)| 1 + 4 + k.len() + v.map_or(0, |v| 4 + v.len()))
        .sum()
}

/// Serialize a batch of changes onto `out`: tag(1) | klen(u32) | key | [vlen(u32) | value].
fn encode_changes_into<'a, I>(out: &mut Vec<u8>, changes: I)
where
    I: IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
{
    for (k, v) in changes {
        match v {
            Some(v) => {
                out.push(PUT);
                out.extend_from_slice(&(k.len() as u32).to_le_bytes());
                out.extend_from_slice(k);
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                out.extend_from_slice(v);
            }
            None => {
                out.push(DEL);
                out.extend_from_slice(&(k.len() as u32).to_le_bytes());
                out.extend_from_slice(k);
            }
        }
    }
}

type Change = (Vec<u8>, Option<Vec<u8>>);
/// One changed record as the tracked map hands it out: `(key, Some(value) | None = deleted)`.
pub type ChangeRef<'a> = (&'a [u8], Option<&'a [u8]>);

fn take<'a>(buf: &'a [u8], pos: &mut usize, n: usize) -> Option<&'a [u8]> {
    let end = pos.checked_add(n)?;
    let s = buf.get(*pos..end)?;
    *pos = end;
    Some(s)
}

fn take_u32(buf: &[u8], pos: &mut usize) -> Option<u32> {
    let s = take(buf, pos, 4)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn decode_changes(buf: &[u8]) -> Option<Vec<Change>> {
    let mut pos = 0usize;
    let mut out = Vec::new();
    while pos < buf.len() {
        let tag = *take(buf, &mut pos, 1)?.first()?;
        let klen = take_u32(buf, &mut pos)? as usize;
        let key = take(buf, &mut pos, klen)?.to_vec();
        match tag {
            PUT => {
                let vlen = take_u32(buf, &mut pos)? as usize;
                let val = take(buf, &mut pos, vlen)?.to_vec();
                out.push((key, Some(val)));
            }
            DEL => out.push((key, None)),
            _ => return None,
        }
    }
    Some(out)
}

impl Log {
    /// One record (`len | nonce | ciphertext`) of the changes `encode` appends; `plain_len`
    /// is the exact length it appends. The plaintext is written once, straight into the
    /// record, and encrypted where it lies (before: built in a growing buffer, then
    /// encrypted into a new one, then copied into a third; at 64 members a commit's
    /// record is ~150 KB, so each of those was a fresh mmap and its page faults). Only
    /// ciphertext is left in the buffer, or zeros on error.
    fn seal_with(
        &self,
        nonce: [u8; NONCE_LEN],
        generation: u64,
        seq: u64,
        plain_len: usize,
        encode: impl FnOnce(&mut Vec<u8>),
    ) -> Result<Vec<u8>, Error> {
        let len = u32::try_from(NONCE_LEN + plain_len + TAG_LEN)
            .map_err(|_| Error::new(Kind::Storage, "record too large"))?;
        let aad = record_aad(&self.salt, generation, seq);
        let mut out = Vec::with_capacity(4 + NONCE_LEN + plain_len + TAG_LEN);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&nonce);
        let start = out.len();
        encode(&mut out);
        if out.len() != start + plain_len {
            out.zeroize();
            return Err(Error::new(Kind::Storage, "record length mismatch"));
        }
        match self.cipher.encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            &aad,
            &mut out[start..],
        ) {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                Ok(out)
            }
            Err(_) => {
                out.zeroize();
                Err(Error::new(Kind::Storage, "record encryption failed"))
            }
        }
    }

    /// The record of a batch of changes (see `seal_with`).
    fn seal_changes<'a, I>(
        &self,
        rng: &RustCrypto,
        generation: u64,
        seq: u64,
        changes: I,
    ) -> Result<Vec<u8>, Error>
    where
        I: IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
    {
        let nonce: [u8; NONCE_LEN] = rng
            .random_array()
            .map_err(|_| Error::new(Kind::Storage, "no randomness"))?;
        let n = encoded_len(changes.clone());
        self.seal_with(nonce, generation, seq, n, |out| {
            encode_changes_into(out, changes)
        })
    }

    fn header(&self, rng: &RustCrypto, generation: u64) -> Result<Vec<u8>, Error> {
        let nonce: [u8; NONCE_LEN] = rng
            .random_array()
            .map_err(|_| Error::new(Kind::Storage, "no randomness"))?;
        let prefix = header_prefix(&self.salt, generation);
        let ct = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: CHECK_PLAIN,
                    aad: &prefix,
                },
            )
            .map_err(|_| Error::new(Kind::Storage, "header encryption failed"))?;
        let mut out = prefix;
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Write header + one snapshot record (of `generation`) to a temp file and move it in
    /// place. Atomic for the caller: on Err the store file and `self` are unchanged; the
    /// rename is the commit point, after which nothing fails (a failed fsync of the
    /// directory only delays durability of the rename: it is retried before the next write).
    fn write_snapshot(
        &mut self,
        rng: &RustCrypto,
        map: &TrackedMap,
        generation: u64,
    ) -> Result<(), Error> {
        let tmp = self.dir.join(TMP_FILE);
        let mut buf = self.header(rng, generation)?;
        let all = map.iter().map(|(k, v)| (k.as_slice(), Some(v.as_slice())));
        buf.extend_from_slice(&self.seal_changes(rng, generation, 0, all)?);
        let written = (|| {
            let _ = fs::remove_file(&tmp);
            // Append mode: after a failed append is cut off, the next one lands at the end.
            let mut f = OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| io_err("create temp store", e))?;
            f.write_all(&buf)
                .map_err(|e| io_err("write temp store", e))?;
            f.sync_all().map_err(|e| io_err("fsync temp store", e))?;
            fs::rename(&tmp, self.dir.join(STORE_FILE)).map_err(|e| io_err("rename store", e))?;
            Ok(f)
        })();
        let f = match written {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        // The handle follows the file through the rename; no reopen that could fail.
        self.file = f;
        self.generation = generation;
        self.seq = 1;
        self.size = buf.len() as u64;
        self.snapshot_size = self.size;
        self.stats.bytes_written += buf.len() as u64;
        self.stats.fsyncs += 1;
        self.sync_dir_now();
        Ok(())
    }

    fn sync_dir_now(&mut self) {
        self.dir_sync_pending = sync_dir(&self.dir).is_err();
        if !self.dir_sync_pending {
            self.stats.fsyncs += 1;
        }
    }

    /// Create a new store; refuses to overwrite an existing one.
    pub fn create(
        dir: &Path,
        secret: &[u8],
        durable: bool,
        rng: &RustCrypto,
        map: &TrackedMap,
    ) -> Result<Log, Error> {
        fs::create_dir_all(dir).map_err(|e| io_err("create state dir", e))?;
        let path = dir.join(STORE_FILE);
        if path.exists() {
            return Err(Error::new(
                Kind::Exists,
                format!("a store already exists in {}", dir.display()),
            ));
        }
        let salt: [u8; SALT_LEN] = rng
            .random_array()
            .map_err(|_| Error::new(Kind::Storage, "no randomness"))?;
        let cipher = derive_cipher(secret, &salt)?;
        // Placeholder handle; write_snapshot replaces it with the real file.
        let placeholder = File::open(dir).map_err(|e| io_err("open state dir", e))?;
        let mut log = Log {
            dir: dir.to_path_buf(),
            file: placeholder,
            cipher,
            salt,
            generation: 0,
            seq: 0,
            size: 0,
            snapshot_size: 0,
            durable,
            dir_sync_pending: false,
            stats: Stats::default(),
        };
        log.write_snapshot(rng, map, 0)?;
        if log.dir_sync_pending {
            sync_dir(dir)?;
        }
        Ok(log)
    }

    /// Open an existing store, replaying every intact record into `map`.
    ///
    /// A wrong secret is detected on the header check block before any write happens.
    /// A torn or corrupt tail (crash during append) is cut off: the operation it held
    /// never happened.
    pub fn open(
        dir: &Path,
        secret: &[u8],
        durable: bool,
        map: &mut TrackedMap,
    ) -> Result<Log, Error> {
        let path = dir.join(STORE_FILE);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::new(
                    Kind::NotFound,
                    format!("no store in {}", dir.display()),
                ))
            }
            Err(e) => return Err(io_err("open store", e)),
        };
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|e| io_err("read store", e))?;
        drop(f);
        if buf.len() < HEADER_LEN || &buf[..8] != MAGIC {
            return Err(Error::new(Kind::Storage, "not a qpc store (bad header)"));
        }
        let mut salt = [0u8; SALT_LEN];
        salt.copy_from_slice(&buf[8..8 + SALT_LEN]);
        let mut gen_bytes = [0u8; 8];
        gen_bytes.copy_from_slice(&buf[8 + SALT_LEN..16 + SALT_LEN]);
        let generation = u64::from_le_bytes(gen_bytes);
        let cipher = derive_cipher(secret, &salt)?;
        let nonce_at = 16 + SALT_LEN;
        let prefix = header_prefix(&salt, generation);
        let check = cipher
            .decrypt(
                XNonce::from_slice(&buf[nonce_at..nonce_at + NONCE_LEN]),
                Payload {
                    msg: &buf[nonce_at + NONCE_LEN..HEADER_LEN],
                    aad: &prefix,
                },
            )
            .map_err(|_| Error::new(Kind::WrongSecret, "wrong secret for this store"))?;
        if check.as_slice() != CHECK_PLAIN {
            return Err(Error::new(Kind::WrongSecret, "wrong secret for this store"));
        }

        let mut pos = HEADER_LEN;
        let mut seq = 0u64;
        let mut snapshot_size = 0u64;
        while pos < buf.len() {
            let mut p = pos;
            let Some(len) = take_u32(&buf, &mut p) else {
                break;
            };
            if len < (NONCE_LEN + TAG_LEN) as u32 || len > MAX_RECORD {
                break;
            }
            let Some(body) = take(&buf, &mut p, len as usize) else {
                break;
            };
            let aad = record_aad(&salt, generation, seq);
            let Ok(plain) = cipher.decrypt(
                XNonce::from_slice(&body[..NONCE_LEN]),
                Payload {
                    msg: &body[NONCE_LEN..],
                    aad: &aad,
                },
            ) else {
                break;
            };
            let plain = Zeroizing::new(plain);
            let Some(changes) = decode_changes(&plain) else {
                break;
            };
            for (k, v) in changes {
                map.load(k, v);
            }
            if seq == 0 {
                snapshot_size = p as u64;
            }
            seq += 1;
            pos = p;
        }
        if seq == 0 {
            return Err(Error::new(Kind::Storage, "store has no intact snapshot"));
        }
        let _ = fs::remove_file(dir.join(TMP_FILE));
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_err("open store for append", e))?;
        if (pos as u64) < buf.len() as u64 {
            // Torn tail from a crash mid-append: drop it so new records follow good ones.
            file.set_len(pos as u64)
                .map_err(|e| io_err("truncate torn tail", e))?;
            file.sync_all().map_err(|e| io_err("fsync store", e))?;
        }
        Ok(Log {
            dir: dir.to_path_buf(),
            file,
            cipher,
            salt,
            generation,
            seq,
            size: pos as u64,
            snapshot_size,
            durable,
            dir_sync_pending: false,
            stats: Stats::default(),
        })
    }

    /// Append one record holding every change of one operation; compact when large.
    ///
    /// All or nothing: on Err the store file holds exactly what it held before (a partly
    /// written or unsynced record is cut off again), so the caller can roll its memory
    /// back to match. `map` is the state including `changes` (written whole on compaction).
    pub fn commit(
        &mut self,
        rng: &RustCrypto,
        changes: &[ChangeRef<'_>],
        map: &TrackedMap,
    ) -> Result<(), Error> {
        if changes.is_empty() {
            return Ok(());
        }
        if self.dir_sync_pending {
            sync_dir(&self.dir)?;
            self.dir_sync_pending = false;
            self.stats.fsyncs += 1;
        }
        if self.size > COMPACT_FLOOR.max(self.snapshot_size.saturating_mul(COMPACT_RATIO)) {
            self.write_snapshot(rng, map, self.generation + 1)?;
            self.stats.compactions += 1;
            return Ok(());
        }
        let rec = self.seal_changes(rng, self.generation, self.seq, changes.iter().copied())?;
        let mut written = self
            .file
            .write_all(&rec)
            .map_err(|e| io_err("append store record", e));
        if written.is_ok() && self.durable {
            written = self.file.sync_data().map_err(|e| io_err("fsync store", e));
            self.stats.fsyncs += 1;
        }
        if let Err(e) = written {
            // Never leave a half (or unconfirmed) record in front of later ones: the next
            // record reuses this sequence number, and the operation is rolled back.
            let _ = self.file.set_len(self.size);
            return Err(e);
        }
        self.seq += 1;
        self.size += rec.len() as u64;
        self.stats.bytes_written += rec.len() as u64;
        self.stats.records += 1;
        Ok(())
    }

    pub fn file_size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TmpDir;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    /// One operation: change `key` in `map` and make it one log record.
    fn put(log: &mut Log, map: &mut TrackedMap, key: &[u8], value: Vec<u8>) {
        map.insert(key.to_vec(), value);
        let changes = map.pending_changes();
        log.commit(&RustCrypto::default(), &changes, map)
            .expect("commit");
        map.commit();
    }

    fn sorted(map: &TrackedMap) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut v: Vec<_> = map.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort();
        v
    }

    fn new_log(tmp: &TmpDir) -> (Log, TrackedMap) {
        let map = TrackedMap::default();
        let log =
            Log::create(tmp.path(), SECRET, false, &RustCrypto::default(), &map).expect("create");
        (log, map)
    }

    fn reopen(tmp: &TmpDir) -> (Log, TrackedMap) {
        let mut map = TrackedMap::default();
        let log = Log::open(tmp.path(), SECRET, false, &mut map).expect("open");
        (log, map)
    }

    fn store(tmp: &TmpDir) -> PathBuf {
        tmp.path().join(STORE_FILE)
    }

    /// A record is what it was before the plaintext was encrypted in place: length, nonce,
    /// then `encrypt(plaintext)` (ciphertext and tag), so old stores read as before and
    /// old code reads new records.
    #[test]
    fn records_are_the_same_bytes_as_before() {
        let tmp = TmpDir::new("record-bytes");
        let (log, _map) = new_log(&tmp);
        let changes: Vec<ChangeRef<'_>> = vec![(b"k1", Some(b"value one")), (b"k2", None)];
        let nonce = [7u8; NONCE_LEN];
        let rec = log
            .seal_with(nonce, 3, 9, encoded_len(changes.iter().copied()), |out| {
                encode_changes_into(out, changes.iter().copied())
            })
            .expect("seal");
        // The old path, spelled out.
        let mut plain = Vec::new();
        plain.extend_from_slice(&[PUT, 2, 0, 0, 0, b'k', b'1', 9, 0, 0, 0]);
        plain.extend_from_slice(b"value one");
        plain.extend_from_slice(&[DEL, 2, 0, 0, 0, b'k', b'2']);
        let aad = record_aad(&log.salt, 3, 9);
        let ct = log
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .expect("encrypt");
        let mut old = ((NONCE_LEN + ct.len()) as u32).to_le_bytes().to_vec();
        old.extend_from_slice(&nonce);
        old.extend_from_slice(&ct);
        assert_eq!(rec, old);
        let wrong = log.seal_with(nonce, 3, 9, 5, |out| out.extend_from_slice(b"four"));
        assert!(wrong.is_err(), "a length that does not match is refused");
    }

    #[test]
    fn compaction_rewrites_the_live_state_and_keeps_it() {
        let tmp = TmpDir::new("compact");
        let (mut log, mut map) = new_log(&tmp);
        // Rewrite four 32 KiB records until the log passes the compaction threshold.
        let mut i = 0u32;
        while log.stats.compactions == 0 {
            let value = i.to_le_bytes().repeat(8 * 1024);
            put(&mut log, &mut map, format!("k{}", i % 4).as_bytes(), value);
            i += 1;
            assert!(i < 100, "no compaction after {i} records");
        }
        let size = std::fs::metadata(store(&tmp)).expect("stat").len();
        assert_eq!(size, log.file_size());
        assert!(
            size < COMPACT_FLOOR,
            "compacted file still holds the history: {size}"
        );
        // Appends continue after the new snapshot, and everything reads back.
        put(&mut log, &mut map, b"after", b"compaction".to_vec());
        let want = sorted(&map);
        drop(log);
        let (log2, map2) = reopen(&tmp);
        assert!(sorted(&map2) == want);
        assert_eq!(log2.generation, 1);
        assert!(!tmp.path().join(TMP_FILE).exists());
    }

    #[test]
    fn failed_compaction_changes_nothing() {
        let tmp = TmpDir::new("compact-fail");
        let (mut log, mut map) = new_log(&tmp);
        let mut i = 0u32;
        while log.file_size() <= COMPACT_FLOOR.max(log.snapshot_size * COMPACT_RATIO) {
            put(
                &mut log,
                &mut map,
                format!("k{}", i % 4).as_bytes(),
                vec![i as u8; 32 * 1024],
            );
            i += 1;
        }
        // The next commit compacts; make that fail (the temp file cannot be created).
        std::fs::create_dir(tmp.path().join(TMP_FILE)).expect("mkdir");
        let before = std::fs::read(store(&tmp)).expect("read");
        map.insert(b"x".to_vec(), b"lost".to_vec());
        let changes = map.pending_changes();
        assert!(log.commit(&RustCrypto::default(), &changes, &map).is_err());
        map.rollback();
        assert!(std::fs::read(store(&tmp)).expect("read") == before);
        assert_eq!((log.generation, log.stats.compactions), (0, 0));
        std::fs::remove_dir(tmp.path().join(TMP_FILE)).expect("rmdir");
        put(&mut log, &mut map, b"x", b"kept".to_vec());
        assert_eq!(log.stats.compactions, 1);
        put(&mut log, &mut map, b"y", b"appended".to_vec());
        let want = sorted(&map);
        drop(log);
        assert!(sorted(&reopen(&tmp).1) == want);
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_survive() {
        let tmp = TmpDir::new("torn");
        let (mut log, mut map) = new_log(&tmp);
        put(&mut log, &mut map, b"one", b"1".to_vec());
        put(&mut log, &mut map, b"two", b"2".to_vec());
        let good = log.file_size();
        put(&mut log, &mut map, b"three", vec![3; 100]);
        drop(log);
        // A crash in the middle of the third record's append.
        let f = OpenOptions::new()
            .write(true)
            .open(store(&tmp))
            .expect("open");
        f.set_len(good + 60).expect("truncate");
        drop(f);
        let (mut log, mut map) = reopen(&tmp);
        assert_eq!(map.get(b"one").map(Vec::as_slice), Some(b"1".as_slice()));
        assert_eq!(map.get(b"two").map(Vec::as_slice), Some(b"2".as_slice()));
        assert!(map.get(b"three").is_none());
        assert_eq!(std::fs::metadata(store(&tmp)).expect("stat").len(), good);
        // The next record follows the good ones and is read back.
        put(&mut log, &mut map, b"four", b"4".to_vec());
        drop(log);
        let (_, map) = reopen(&tmp);
        assert!(map.get(b"four").is_some() && map.get(b"two").is_some());
    }

    #[test]
    fn wrong_secret_is_detected_before_any_write() {
        let tmp = TmpDir::new("secret");
        let (mut log, mut map) = new_log(&tmp);
        put(&mut log, &mut map, b"one", b"1".to_vec());
        drop(log);
        // A torn tail too: a wrong secret must not even cut that off.
        let mut f = OpenOptions::new()
            .append(true)
            .open(store(&tmp))
            .expect("open");
        f.write_all(&[0x40, 0, 0, 0, 1, 2, 3]).expect("append");
        drop(f);
        let before = std::fs::read(store(&tmp)).expect("read");
        let mut map = TrackedMap::default();
        let err = Log::open(
            tmp.path(),
            b"another secret, 32 bytes long...",
            false,
            &mut map,
        )
        .err()
        .expect("wrong secret must fail");
        assert_eq!(err.kind, Kind::WrongSecret);
        assert!(std::fs::read(store(&tmp)).expect("read") == before);
        assert!(!tmp.path().join(TMP_FILE).exists());
        assert_eq!(map.iter().count(), 0);
        let (_, map) = reopen(&tmp);
        assert_eq!(map.get(b"one").map(Vec::as_slice), Some(b"1".as_slice()));
    }
}
