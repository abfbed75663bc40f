//! `qpc_node._core.Negentropy`: range-based set reconciliation (the maintained
//! `negentropy` crate, protocol v1) for the inventory sync between mesh nodes.
//!
//! One object is one side of one session: it is built over a snapshot of the local
//! inventory (timestamp, 32-byte id) and then either initiates (`initiate`, then
//! `reconcile_with_ids` on each reply) or answers (`reconcile` on each query). The
//! peer's bytes are untrusted: every failure is a `SyncError` (a `ValueError`), never a
//! panic. The crate's parser checks its lengths itself (`get_bytes`, the id-count check
//! before reserving room); on top of that each call runs under `catch_unwind` (the crate
//! is pure Rust with no FFI of its own and our profiles unwind, so a panic reaches the
//! catch), and a session that panicked refuses every later call, since the crate's
//! state is then unknown.
//!
//! Limits: at most `NEGENTROPY_MAX_ITEMS` items per object (memory: 40 bytes per item),
//! timestamps below `u64::MAX` (the protocol's "infinity" bound: an item there would be
//! outside every range), and `frame_size_limit` (0 = unlimited, else >= 4096) bounds
//! every message this side produces. Callers facing peers always pass a limit: without
//! one a short query can ask for long id lists (up to ~50x amplification).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use negentropy::{Id, NegentropyStorageBase, NegentropyStorageVector};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};

pyo3::create_exception!(
    qpc_node._core,
    SyncError,
    PyValueError,
    "Malformed or unusable set-reconciliation input (a negentropy message, item or state)."
);

/// Most items one reconciliation object takes (40 bytes each: 32 MiB + vector slack).
pub const MAX_ITEMS: usize = 1 << 20;
/// Id length the protocol fixes.
pub const ID_LEN: usize = negentropy::ID_SIZE;

type Engine = negentropy::Negentropy<'static, NegentropyStorageVector>;

struct Session {
    engine: Engine,
    /// Set once a call panicked inside the crate: its state is unknown from then on.
    broken: bool,
}

#[derive(Debug)]
pub struct SyncFailure(String);

impl From<SyncFailure> for PyErr {
    fn from(e: SyncFailure) -> PyErr {
        SyncError::new_err(e.0)
    }
}

fn fail(what: &str, e: negentropy::Error) -> SyncFailure {
    SyncFailure(format!("{what}: {e}"))
}

/// Build the sealed storage and engine (the part that needs no Python objects); also
/// returns how many distinct items it holds (sealing collapses exact duplicates).
pub fn build(
    items: Vec<(u64, [u8; ID_LEN])>,
    frame_size_limit: u64,
) -> Result<(Engine, usize), SyncFailure> {
    let mut storage = NegentropyStorageVector::with_capacity(items.len());
    for (ts, id) in items {
        storage
            .insert(ts, Id::from_byte_array(id))
            .map_err(|e| fail("insert", e))?;
    }
    storage.seal().map_err(|e| fail("seal", e))?;
    let len = storage.size().map_err(|e| fail("size", e))?;
    let engine =
        Engine::owned(storage, frame_size_limit).map_err(|e| fail("frame_size_limit", e))?;
    Ok((engine, len))
}

/// Run one engine call under `catch_unwind`; a panic breaks the session for good.
fn guarded<T>(
    session: &Mutex<Session>,
    f: impl FnOnce(&mut Engine) -> Result<T, negentropy::Error>,
    what: &str,
) -> Result<T, SyncFailure> {
    // The lock is only ever held inside this function, around a caught call, so it is
    // never poisoned; map it anyway rather than unwrap.
    let mut s = session
        .lock()
        .map_err(|_| SyncFailure("reconciliation state poisoned".into()))?;
    if s.broken {
        return Err(SyncFailure(
            "reconciliation session broken by an earlier internal error".into(),
        ));
    }
    match catch_unwind(AssertUnwindSafe(|| f(&mut s.engine))) {
        Ok(r) => r.map_err(|e| fail(what, e)),
        Err(_) => {
            s.broken = true;
            Err(SyncFailure(format!(
                "{what}: internal error in the reconciliation library"
            )))
        }
    }
}

/// One side of one negentropy session over a snapshot of (timestamp, 32-byte id) items.
#[pyclass(frozen, module = "qpc_node._core")]
pub struct Negentropy {
    session: Mutex<Session>,
    len: usize,
}

/// Read the Python items into plain values, every bad item a `SyncError`.
fn extract_items(items: &Bound<'_, PyAny>) -> PyResult<Vec<(u64, [u8; ID_LEN])>> {
    let n = items
        .len()
        .map_err(|_| SyncError::new_err("items must be a sized sequence"))?;
    if n > MAX_ITEMS {
        return Err(SyncError::new_err(format!(
            "{n} items exceed the limit of {MAX_ITEMS}"
        )));
    }
    let mut out = Vec::with_capacity(n);
    for (i, item) in items.try_iter()?.enumerate() {
        let item = item?;
        if i >= MAX_ITEMS {
            return Err(SyncError::new_err(format!("more than {MAX_ITEMS} items")));
        }
        let (ts, id): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item
            .extract()
            .map_err(|_| SyncError::new_err(format!("item {i} is not a (timestamp, id) pair")))?;
        let ts: u64 = ts
            .extract()
            .map_err(|_| SyncError::new_err(format!("item {i}: timestamp is not a u64")))?;
        if ts == u64::MAX {
            return Err(SyncError::new_err(format!(
                "item {i}: timestamp 2**64-1 is reserved (the protocol's upper bound)"
            )));
        }
        let id = id
            .cast::<PyBytes>()
            .map_err(|_| SyncError::new_err(format!("item {i}: id is not bytes")))?;
        let id: [u8; ID_LEN] = id
            .as_bytes()
            .try_into()
            .map_err(|_| SyncError::new_err(format!("item {i}: id is not {ID_LEN} bytes")))?;
        out.push((ts, id));
    }
    Ok(out)
}

fn ids_to_list<'py>(py: Python<'py>, ids: &[Id]) -> PyResult<Bound<'py, PyList>> {
    PyList::new(py, ids.iter().map(|id| PyBytes::new(py, id.as_bytes())))
}

#[pymethods]
impl Negentropy {
    /// Seal a snapshot of `items` ((timestamp, 32-byte id); duplicates collapse).
    #[new]
    #[pyo3(signature = (items, frame_size_limit = 0))]
    fn new(py: Python<'_>, items: &Bound<'_, PyAny>, frame_size_limit: u64) -> PyResult<Self> {
        let items = extract_items(items)?;
        let (engine, len) = py.detach(|| {
            catch_unwind(AssertUnwindSafe(|| build(items, frame_size_limit))).unwrap_or_else(|_| {
                Err(SyncFailure(
                    "internal error in the reconciliation library".into(),
                ))
            })
        })?;
        Ok(Negentropy {
            session: Mutex::new(Session {
                engine,
                broken: false,
            }),
            len,
        })
    }

    fn __len__(&self) -> usize {
        self.len
    }

    /// First message of a session (this side becomes the initiator; once only).
    fn initiate<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let out = py.detach(|| guarded(&self.session, |e| e.initiate(), "initiate"))?;
        Ok(PyBytes::new(py, &out))
    }

    /// Responder: answer one query from the initiator.
    fn reconcile<'py>(&self, py: Python<'py>, query: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        let out = py.detach(|| guarded(&self.session, |e| e.reconcile(query), "reconcile"))?;
        Ok(PyBytes::new(py, &out))
    }

    /// Initiator: process one reply. Returns (next query or None when reconciliation is
    /// complete, ids we have that the peer lacks, ids the peer has that we lack); the id
    /// lists hold only what this reply revealed.
    #[allow(clippy::type_complexity)]
    fn reconcile_with_ids<'py>(
        &self,
        py: Python<'py>,
        msg: &[u8],
    ) -> PyResult<(
        Option<Bound<'py, PyBytes>>,
        Bound<'py, PyList>,
        Bound<'py, PyList>,
    )> {
        let (next, have, need) = py.detach(|| {
            guarded(
                &self.session,
                |e| {
                    let mut have = Vec::new();
                    let mut need = Vec::new();
                    let next = e.reconcile_with_ids(msg, &mut have, &mut need)?;
                    Ok((next, have, need))
                },
                "reconcile_with_ids",
            )
        })?;
        Ok((
            next.map(|b| PyBytes::new(py, &b)),
            ids_to_list(py, &have)?,
            ids_to_list(py, &need)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> [u8; ID_LEN] {
        // Spread ids over the whole space like hashes would.
        let mut out = [0u8; ID_LEN];
        let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
        for chunk in out.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        out
    }

    fn session(items: Vec<(u64, [u8; ID_LEN])>, limit: u64) -> Mutex<Session> {
        let (engine, _) = build(items, limit).expect("build");
        Mutex::new(Session {
            engine,
            broken: false,
        })
    }

    /// Run a whole session; returns (have, need, bytes exchanged, largest message).
    fn run(
        a: Vec<(u64, [u8; ID_LEN])>,
        b: Vec<(u64, [u8; ID_LEN])>,
        limit: u64,
    ) -> (Vec<Id>, Vec<Id>, usize, usize) {
        let init = session(a, limit);
        let resp = session(b, limit);
        let mut msg = guarded(&init, |e| e.initiate(), "initiate").unwrap();
        let (mut have, mut need, mut bytes, mut largest) = (vec![], vec![], 0, 0);
        for _ in 0..100 {
            bytes += msg.len();
            largest = largest.max(msg.len());
            let reply = guarded(&resp, |e| e.reconcile(&msg), "reconcile").unwrap();
            bytes += reply.len();
            largest = largest.max(reply.len());
            let next = guarded(
                &init,
                |e| e.reconcile_with_ids(&reply, &mut have, &mut need),
                "reconcile_with_ids",
            )
            .unwrap();
            match next {
                Some(m) => msg = m,
                None => return (have, need, bytes, largest),
            }
        }
        panic!("no convergence in 100 rounds");
    }

    #[test]
    fn finds_both_differences() {
        let common: Vec<_> = (0..1000).map(|i| (1000 + i, id(i))).collect();
        let mut a = common.clone();
        a.push((5, id(5000)));
        let mut b = common;
        b.push((1500, id(6000)));
        b.push((1500, id(6001)));
        let (have, need, _, _) = run(a, b, 0);
        assert_eq!(have, vec![Id::from_byte_array(id(5000))]);
        let mut need: Vec<_> = need.iter().map(|i| i.to_bytes()).collect();
        need.sort();
        let mut want = vec![id(6000), id(6001)];
        want.sort();
        assert_eq!(need, want);
    }

    #[test]
    fn frame_size_limit_bounds_every_message() {
        // Disjoint sets: the worst case, everything must be listed.
        let a: Vec<_> = (0..5000).map(|i| (i, id(i))).collect();
        let b: Vec<_> = (0..5000).map(|i| (i, id(100_000 + i))).collect();
        let (have, need, _, largest) = run(a, b, 4096);
        assert_eq!((have.len(), need.len()), (5000, 5000));
        assert!(largest <= 4096, "largest message {largest} > 4096");
    }

    #[test]
    fn limit_below_4096_refused() {
        assert!(build(vec![], 100).is_err());
        assert!(build(vec![], 4096).is_ok());
    }

    /// Random and mutated messages never panic: they fail or produce a bounded answer.
    #[test]
    fn fuzz_messages_never_panic() {
        let items: Vec<_> = (0..300).map(|i| (i / 3, id(i))).collect();
        let valid = guarded(&session(items.clone(), 0), |e| e.initiate(), "i").unwrap();
        let mut x: u64 = 0x1234_5678;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..3000 {
            let mut msg = if round % 2 == 0 {
                valid.clone()
            } else {
                let n = (rnd() % 200) as usize;
                let mut m: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
                if !m.is_empty() && rnd() % 2 == 0 {
                    m[0] = 0x61;
                }
                m
            };
            for _ in 0..(rnd() % 4) {
                if !msg.is_empty() {
                    let at = (rnd() as usize) % msg.len();
                    msg[at] = rnd() as u8;
                }
            }
            if rnd() % 3 == 0 {
                msg.truncate((rnd() as usize) % (msg.len() + 1));
            }
            let resp = session(items.clone(), 4096);
            if let Ok(out) = guarded(&resp, |e| e.reconcile(&msg), "r") {
                assert!(out.len() <= 4096);
            }
            let init = session(items.clone(), 4096);
            guarded(&init, |e| e.initiate(), "i").unwrap();
            let (mut h, mut n) = (vec![], vec![]);
            if let Ok(Some(out)) =
                guarded(&init, |e| e.reconcile_with_ids(&msg, &mut h, &mut n), "w")
            {
                assert!(out.len() <= 4096);
            }
            assert!(!resp.lock().unwrap().broken && !init.lock().unwrap().broken);
        }
    }

    #[test]
    fn panic_breaks_the_session() {
        let s = session(vec![(1, id(1))], 0);
        let r: Result<(), _> = guarded(&s, |_| panic!("boom"), "x");
        assert!(r.unwrap_err().0.contains("internal error"));
        let again = guarded(&s, |e| e.initiate(), "initiate");
        assert!(again.unwrap_err().0.contains("broken"));
    }

    #[test]
    fn roles_are_enforced() {
        let s = session(vec![(1, id(1))], 0);
        let q = guarded(&s, |e| e.initiate(), "i").unwrap();
        assert!(guarded(&s, |e| e.reconcile(&q), "r").is_err());
        assert!(guarded(&s, |e| e.initiate(), "i").is_err());
    }
}
