//! Rust-side error kinds and their mapping onto the Python exception classes.
//!
//! The exception classes live in Python (`qpc_node.crypto.errors`) so that they
//! subclass `qpc_node.errors.QpcError` and carry a wire status code; Rust only
//! imports and raises them. Errors are built without the GIL (inside `py.detach`)
//! as plain values and become `PyErr`s at the boundary.

use pyo3::PyErr;

pyo3::import_exception!(qpc_node.crypto.errors, MlsError);
// --- fork (mlsb): snapshots, staged commits, external rejoin ---
pyo3::import_exception!(qpc_node.crypto.errors, UnknownSnapshot);
pyo3::import_exception!(qpc_node.crypto.errors, SnapshotLimit);
// --- end fork (mlsb) ---
pyo3::import_exception!(qpc_node.crypto.errors, InvalidMessage);
pyo3::import_exception!(qpc_node.crypto.errors, WrongEpoch);
pyo3::import_exception!(qpc_node.crypto.errors, NotAMember);
pyo3::import_exception!(qpc_node.crypto.errors, StorageError);
pyo3::import_exception!(qpc_node.crypto.errors, WrongSecret);
pyo3::import_exception!(qpc_node.crypto.errors, WelcomeNotForUs);
pyo3::import_exception!(qpc_node.crypto.errors, InvalidKeyPackage);
pyo3::import_exception!(qpc_node.crypto.errors, UnknownGroup);
pyo3::import_exception!(qpc_node.crypto.errors, InvalidSignature);
pyo3::import_exception!(qpc_node.crypto.errors, MlsArgumentError);
pyo3::import_exception!(qpc_node.crypto.errors, StoreExists);
pyo3::import_exception!(qpc_node.crypto.errors, StoreNotFound);
pyo3::import_exception!(qpc_node.crypto.errors, PendingCommit);
pyo3::import_exception!(qpc_node.crypto.errors, NoPendingCommit);
pyo3::import_exception!(qpc_node.crypto.errors, DuplicateMessage);
pyo3::import_exception!(qpc_node.crypto.errors, RatchetWindowError);
// --- gwire: a commit naming a proposal we have not received ---
pyo3::import_exception!(qpc_node.crypto.errors, MissingProposal);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    // --- fork (mlsb) ---
    /// No snapshot with this id for this group (never taken, or released).
    UnknownSnapshot,
    /// The group already holds `fork::MAX_SNAPSHOTS` snapshots.
    SnapshotLimit,
    // --- end fork (mlsb) ---
    /// Generic MLS failure (library/state errors).
    Mls,
    InvalidMessage,
    WrongEpoch,
    NotAMember,
    Storage,
    WrongSecret,
    WelcomeNotForUs,
    InvalidKeyPackage,
    UnknownGroup,
    InvalidSignature,
    Argument,
    Exists,
    NotFound,
    /// Our own commit awaits merge/clear; nothing else may change the group meanwhile.
    PendingCommit,
    /// merge_pending_commit with nothing pending (never created, cleared, or superseded).
    NoPendingCommit,
    /// The message's key was already used: we processed this message before.
    Duplicate,
    /// The message's generation is outside the sender ratchet window.
    OutOfWindow,
    /// (gwire) A commit covers a proposal (by reference) we have not received yet.
    MissingProposal,
}

#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    pub msg: String,
}

impl Error {
    pub fn new(kind: Kind, msg: impl Into<String>) -> Self {
        Error {
            kind,
            msg: msg.into(),
        }
    }

    /// Wrap any library error with its Debug text (OpenMLS errors are descriptive).
    pub fn from_dbg(kind: Kind, what: &str, e: impl std::fmt::Debug) -> Self {
        Error {
            kind,
            msg: format!("{what}: {e:?}"),
        }
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let m = e.msg;
        match e.kind {
            // --- fork (mlsb) ---
            Kind::UnknownSnapshot => UnknownSnapshot::new_err(m),
            Kind::SnapshotLimit => SnapshotLimit::new_err(m),
            // --- end fork (mlsb) ---
            Kind::Mls => MlsError::new_err(m),
            Kind::InvalidMessage => InvalidMessage::new_err(m),
            Kind::WrongEpoch => WrongEpoch::new_err(m),
            Kind::NotAMember => NotAMember::new_err(m),
            Kind::Storage => StorageError::new_err(m),
            Kind::WrongSecret => WrongSecret::new_err(m),
            Kind::WelcomeNotForUs => WelcomeNotForUs::new_err(m),
            Kind::InvalidKeyPackage => InvalidKeyPackage::new_err(m),
            Kind::UnknownGroup => UnknownGroup::new_err(m),
            Kind::InvalidSignature => InvalidSignature::new_err(m),
            Kind::Argument => MlsArgumentError::new_err(m),
            Kind::Exists => StoreExists::new_err(m),
            Kind::NotFound => StoreNotFound::new_err(m),
            Kind::PendingCommit => PendingCommit::new_err(m),
            Kind::NoPendingCommit => NoPendingCommit::new_err(m),
            Kind::Duplicate => DuplicateMessage::new_err(m),
            Kind::OutOfWindow => RatchetWindowError::new_err(m),
            Kind::MissingProposal => MissingProposal::new_err(m),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
