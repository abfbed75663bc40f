//! `qpc_node._core`: the MLS core of quicprochat (OpenMLS 0.9 behind PyO3), plus the
//! negentropy set reconciliation the mesh inventory sync runs on (`sync`).
//!
//! Python imports it through `qpc_node.crypto`, which also defines the exception
//! classes raised here (so they subclass `qpc_node.errors.QpcError`).

mod error;
mod json_ser;
mod mls;
mod persist;
mod split_ser;
mod sync;
mod tracked_storage;

use pyo3::prelude::*;

#[pymodule(gil_used = false)]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_CIPHERSUITE", mls::DEFAULT_SUITE as u16)?;
    m.add("RATCHET_OUT_OF_ORDER", mls::RATCHET_OUT_OF_ORDER)?;
    m.add("RATCHET_MAX_FORWARD", mls::RATCHET_MAX_FORWARD)?;
    m.add("MAX_PAST_EPOCHS", mls::MAX_PAST_EPOCHS)?;
    m.add("COMMITTERS_EXTENSION", mls::COMMITTERS_EXTENSION)?;
    m.add("MAX_SNAPSHOTS", mls::fork::MAX_SNAPSHOTS)?;
    m.add_class::<mls::Identity>()?;
    m.add_class::<mls::Group>()?;
    m.add_class::<mls::Event>()?;
    m.add_class::<mls::KeyPackageInfo>()?;
    m.add_function(wrap_pyfunction!(mls::verify, m)?)?;
    m.add_function(wrap_pyfunction!(mls::fingerprint_of, m)?)?;
    m.add_function(wrap_pyfunction!(mls::inspect_key_package, m)?)?;
    m.add_function(wrap_pyfunction!(mls::key_package_ciphersuite, m)?)?;
    m.add_function(wrap_pyfunction!(mls::key_package_identity, m)?)?;
    m.add_class::<sync::Negentropy>()?;
    m.add("SyncError", m.py().get_type::<sync::SyncError>())?;
    m.add("NEGENTROPY_MAX_ITEMS", sync::MAX_ITEMS)?;
    m.add("NEGENTROPY_ID_LEN", sync::ID_LEN)?;
    Ok(())
}

/// Scratch directories for the Rust unit tests (removed when dropped).
#[cfg(test)]
mod testutil {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    pub struct TmpDir(PathBuf);

    impl TmpDir {
        pub fn new(name: &str) -> TmpDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("qpc-core-{}-{name}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("create temp dir");
            TmpDir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TmpDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
