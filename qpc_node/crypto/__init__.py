"""MLS core of quicprochat: identities, groups, KeyPackages (Rust/OpenMLS underneath).

Everything here is re-exported from the compiled extension ``qpc_node._core``
(see ``qpc_node/_core.pyi`` for signatures) plus the typed errors from
:mod:`qpc_node.crypto.errors`. Typical use::

    ident = Identity.create(state_dir, secret)   # or Identity.open(...)
    g = ident.create_group()
    commit, welcome = g.add([peer_key_package])  # the commit is only pending
    send(commit, welcome)                        # ... the node stored the fan-out:
    g.merge_pending_commit()                     # now the epoch advances
    ct = g.encrypt(b"hello")
    ev = peer_group.process(ct)                  # ev.kind, ev.sender, ev.data, ev.epoch

``add``, ``remove``, ``update`` and ``commit_pending`` create a commit but leave it
pending: the group stays on its epoch until ``merge_pending_commit()``, which the caller
makes only once the commit reached the node. If the send fails, ``clear_pending_commit()``
discards it and the group is usable on the old epoch, exactly as every other member
still has it (merging first would fork the group). While a commit is pending,
``encrypt`` and any further commit raise :class:`PendingCommit`; the pending commit is
part of the persisted state and survives a reopen.

On a mesh (issue 14, docs/groups.md): any member may ask for a membership change with
``propose_add``/``propose_remove``/``propose_update``/``propose_leave``, each returning
the proposal message and its ProposalRef; the member first in ``committers()`` (a
group-context extension, changed by ``commit_pending(committers=...)``) commits them by
reference, and every ``Event`` of a commit says which refs it ``covered``, whom it
``added``/``removed_members``, and the new ``authenticator``. Message secrets of up to
MAX_PAST_EPOCHS past epochs are kept (``past_epochs()``; the caller deletes them by age
with ``prune_past_epochs``), so a message that races a commit still decrypts; per sender
the newest RATCHET_OUT_OF_ORDER generations decrypt in any order. A message processed
twice raises :class:`DuplicateMessage`, one outside the ratchet window
:class:`RatchetWindowError`, one of a deleted (or future) epoch :class:`WrongEpoch`.

Every failure raises a subclass of :class:`MlsError` (itself a ``QpcError``).
State on disk is an encrypted append-only log in ``state_dir/store.qpc``; each
operation appends only the records it changed (``Identity.storage_stats()``).
Every call is atomic: if it raises (including a failed write of its log record or an
internal error in the MLS library), the identity in memory and on disk is exactly what
it was before the call, and remains usable.
"""

from __future__ import annotations

from qpc_node._core import (
    COMMITTERS_EXTENSION,
    DEFAULT_CIPHERSUITE,
    MAX_PAST_EPOCHS,
    RATCHET_MAX_FORWARD,
    RATCHET_OUT_OF_ORDER,
    Event,
    Group,
    Identity,
    KeyPackageInfo,
    fingerprint_of,
    inspect_key_package,
    key_package_ciphersuite,
    key_package_identity,
    verify,
)
from qpc_node.crypto.errors import (
    DuplicateMessage,
    InvalidKeyPackage,
    InvalidMessage,
    InvalidSignature,
    MissingProposal,
    MlsArgumentError,
    MlsError,
    NoPendingCommit,
    NotAMember,
    PendingCommit,
    RatchetWindowError,
    StorageError,
    StoreExists,
    StoreNotFound,
    UnknownGroup,
    WelcomeNotForUs,
    WrongEpoch,
    WrongSecret,
)

__all__ = [
    "COMMITTERS_EXTENSION",
    "DEFAULT_CIPHERSUITE",
    "MAX_PAST_EPOCHS",
    "RATCHET_MAX_FORWARD",
    "RATCHET_OUT_OF_ORDER",
    "DuplicateMessage",
    "Event",
    "Group",
    "Identity",
    "InvalidKeyPackage",
    "InvalidMessage",
    "InvalidSignature",
    "KeyPackageInfo",
    "MissingProposal",
    "MlsArgumentError",
    "MlsError",
    "NoPendingCommit",
    "NotAMember",
    "PendingCommit",
    "RatchetWindowError",
    "StorageError",
    "StoreExists",
    "StoreNotFound",
    "UnknownGroup",
    "WelcomeNotForUs",
    "WrongEpoch",
    "WrongSecret",
    "fingerprint_of",
    "inspect_key_package",
    "key_package_ciphersuite",
    "key_package_identity",
    "verify",
]

# --- fork (mlsb): snapshots, read-only processing, external rejoin (issue 14 Stage B) ---
from qpc_node._core import MAX_SNAPSHOTS
from qpc_node.crypto.errors import SnapshotLimit, UnknownSnapshot

__all__ += ["MAX_SNAPSHOTS", "SnapshotLimit", "UnknownSnapshot"]
# --- end fork (mlsb) ---
