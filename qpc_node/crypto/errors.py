"""Typed MLS errors raised by the Rust core (``qpc_node._core``).

They are defined here, in Python, so that every one of them is a
:class:`qpc_node.errors.QpcError` carrying a wire status code; the Rust extension
imports these classes and raises them. ``except MlsError`` catches all of them.
Whose fault it is follows the h11 convention: input from a peer that fails to
parse, verify or decrypt is also a :class:`~qpc_node.errors.RemoteProtocolError`.
"""

from __future__ import annotations

from qpc_node.errors import QpcError, RemoteProtocolError, StatusCode


class MlsError(QpcError):
    """Base of every error from the MLS core."""

    code = StatusCode.INTERNAL


class InvalidMessage(MlsError, RemoteProtocolError):
    """A message, Welcome or KeyPackage did not parse, verify or decrypt."""

    code = StatusCode.INVALID_ARGUMENT


class WrongEpoch(InvalidMessage):
    """The message belongs to an epoch we no longer (or do not yet) hold keys for."""

    code = StatusCode.FAILED_PRECONDITION


class DuplicateMessage(InvalidMessage):
    """We processed this message before: the key of its generation was used and deleted.

    Store-and-forward delivers duplicates; a caller that counts undecryptable messages
    tells these apart from messages it could never read.
    """

    code = StatusCode.ALREADY_EXISTS


class RatchetWindowError(InvalidMessage):
    """The message is older than the newest RATCHET_OUT_OF_ORDER generations seen from its
    sender, or further ahead than RATCHET_MAX_FORWARD: its key is not (and will not be)
    derived."""

    code = StatusCode.FAILED_PRECONDITION


class WelcomeNotForUs(InvalidMessage):
    """No KeyPackage of ours matches this Welcome (it was meant for someone else)."""

    code = StatusCode.NOT_FOUND


class InvalidKeyPackage(InvalidMessage):
    """A KeyPackage failed to parse or verify (signature, lifetime, suite)."""

    code = StatusCode.INVALID_ARGUMENT


class InvalidSignature(InvalidMessage):
    """A detached signature did not verify."""

    code = StatusCode.UNAUTHENTICATED


class MissingProposal(InvalidMessage):
    """A commit covers (by reference) a proposal we have not received. Relays reorder
    envelopes, so the proposal may still come: the caller holds the commit and retries,
    until the commit's envelope expires."""

    code = StatusCode.FAILED_PRECONDITION


class NotAMember(MlsError):
    """We are not (or no longer) a member of the group, or the named member is unknown."""

    code = StatusCode.PERMISSION_DENIED


class UnknownGroup(MlsError):
    """No group with this id is stored for the identity."""

    code = StatusCode.NOT_FOUND


class MlsArgumentError(MlsError):
    """The caller passed an invalid argument (e.g. a too-short secret)."""

    code = StatusCode.INVALID_ARGUMENT


class PendingCommit(MlsError):
    """Our own commit awaits ``merge_pending_commit``/``clear_pending_commit``.

    Raised by ``encrypt`` and by every call that would make another commit: a message
    sent now would be for an epoch the commit is about to end, and a second commit would
    fork from the first. Merge once the node stored the commit, clear if sending failed.
    """

    code = StatusCode.FAILED_PRECONDITION


class NoPendingCommit(MlsError):
    """``merge_pending_commit`` found nothing to merge.

    The commit was never made, was cleared, or was superseded by another member's commit
    that ``process`` merged first; in the last case ours is lost and must be made again.
    """

    code = StatusCode.FAILED_PRECONDITION


class StorageError(MlsError):
    """The encrypted state on disk could not be read or written."""

    code = StatusCode.INTERNAL


class WrongSecret(StorageError):
    """The secret does not open this store; nothing on disk was changed."""

    code = StatusCode.UNAUTHENTICATED


class StoreExists(StorageError):
    """``Identity.create`` refuses to overwrite an existing store."""

    code = StatusCode.ALREADY_EXISTS


class StoreNotFound(StorageError):
    """``Identity.open`` found no store in the directory."""

    code = StatusCode.NOT_FOUND


__all__ = [
    "DuplicateMessage",
    "InvalidKeyPackage",
    "InvalidMessage",
    "InvalidSignature",
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
]


# --- fork (mlsb): snapshots, staged commits, external rejoin (issue 14 Stage B) ---


class UnknownSnapshot(MlsError):
    """No snapshot with this id is stored for the group (never taken, or released)."""

    code = StatusCode.NOT_FOUND


class SnapshotLimit(MlsError):
    """The group already holds ``MAX_SNAPSHOTS`` snapshots; release some first.

    A bound, so a caller that forgets ``release`` cannot grow the store without limit.
    """

    code = StatusCode.RESOURCE_EXHAUSTED


__all__ += [
    "SnapshotLimit",
    "UnknownSnapshot",
]
# --- end fork (mlsb) ---
