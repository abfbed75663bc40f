"""Entry point frozen by PyInstaller: the same `main` as the `qpc` console script."""

import os
import sys

# cross/measure.py's second reference: what the node's dependencies alone cost (their
# modules and the libraries they load), with none of qpc's own Python imported. The node's
# RSS less this is what qpc's own code and state cost.
NODE_DEPENDENCIES = (
    "trio",
    "aioquic.quic.connection",
    "aioquic.tls",
    "cryptography.x509",
    "zeroconf.asyncio",
    "google.protobuf.descriptor_pool",
    "google.protobuf.symbol_database",
    "google.protobuf.internal.builder",
    "msgspec.msgpack",
    "sqlite3",
    "ifaddr",
)

if __name__ == "__main__":
    if deps := os.environ.get("QPC_MEASURE_DEPS"):
        import importlib

        os.environ.setdefault("CRYPTOGRAPHY_OPENSSL_NO_LEGACY", "1")  # as the node below
        if deps == "1":
            # aioquic.tls and protobuf as the node imports them: their rarely used imports
            # (pyOpenSSL, service_identity, certifi; the pure-Python codec) deferred.
            from qpc_node.deferred_imports import import_aioquic_tls, import_protobuf_runtime

            import_aioquic_tls()
            import_protobuf_runtime()
        # "1": all of them; else a comma-separated list (docs/performance.md's per-layer table)
        for name in NODE_DEPENDENCIES if deps == "1" else deps.split(","):
            importlib.import_module(name)
    if os.environ.get("QPC_MEASURE_BARE"):
        # cross/measure.py's reference: the bundled interpreter with nothing of qpc
        # imported, so the node's RSS is reported as a ratio that holds across machines.
        with open("/proc/self/status") as status:
            print(next(ln.split()[1] for ln in status if ln.startswith("VmRSS:")))
        sys.exit(0)
    # OpenSSL's legacy provider (RC2, DES, Blowfish, MD4, ...) is loaded by cryptography
    # unless told not to; nothing in qpc uses those (Ed25519, X25519, ECDSA, AES-GCM,
    # ChaCha20-Poly1305, SHA-2, HKDF, scrypt are all in the default provider). Not loading
    # it: -0.15 MiB RSS. The operator can still ask for it by setting the variable to 0.
    os.environ.setdefault("CRYPTOGRAPHY_OPENSSL_NO_LEGACY", "1")
    from qpc_node.cli import main

    sys.exit(main())
