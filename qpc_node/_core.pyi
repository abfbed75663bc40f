"""Type stub for the Rust extension (rust/src). Import via ``qpc_node.crypto``."""

from collections.abc import Sequence
from os import PathLike
from typing import Final, Literal, final

__version__: Final[str]
DEFAULT_CIPHERSUITE: Final[int]
RATCHET_OUT_OF_ORDER: Final[int]
"""Per sender and epoch, the newest 128 generations seen decrypt in any order (a message
up to 127 behind the newest one; store-and-forward reordering)."""
RATCHET_MAX_FORWARD: Final[int]
"""A message up to this many generations (1000) ahead of the newest one seen decrypts;
further is a RatchetWindowError."""
MAX_PAST_EPOCHS: Final[int]
"""Hard cap (32) on past epochs whose message secrets a group keeps; the Python core
prunes by age below it with ``Group.prune_past_epochs``."""
COMMITTERS_EXTENSION: Final[int]
"""Private-use GroupContext extension type (0xF0A1) holding the ordered committer list."""
NEGENTROPY_MAX_ITEMS: Final[int]
"""Most items one ``Negentropy`` object takes (2**20)."""
NEGENTROPY_ID_LEN: Final[int]
"""Length of a negentropy id (32)."""
MAX_SNAPSHOTS: Final[int]
"""Snapshots one group may hold at most (``Identity.snapshot``)."""

class SyncError(ValueError):
    """Malformed or unusable set-reconciliation input (message, item or state)."""

@final
class Negentropy:
    """One side of one negentropy (v1) session over a snapshot of the local inventory.

    ``items`` are (timestamp < 2**64-1, 32-byte id) pairs, at most NEGENTROPY_MAX_ITEMS;
    duplicates collapse. ``frame_size_limit`` (0 = unlimited, else >= 4096) bounds every
    message this side produces. Every failure, bad items or peer bytes, is a SyncError.
    """

    def __init__(self, items: Sequence[tuple[int, bytes]], frame_size_limit: int = 0) -> None: ...
    def __len__(self) -> int: ...
    def initiate(self) -> bytes:
        """First message; this side becomes the initiator (once only)."""
    def reconcile(self, query: bytes) -> bytes:
        """Responder: the answer to one query."""
    def reconcile_with_ids(self, msg: bytes) -> tuple[bytes | None, list[bytes], list[bytes]]:
        """Initiator: (next query or None when done, ids we have that the peer lacks,
        ids the peer has that we lack) revealed by this reply. A peer may list any id in
        any range, so the last list can name ids we hold (at another timestamp): callers
        filter it against their own set."""

@final
class Event:
    """Result of ``Group.process`` (and of ``Group.merge_pending_commit``)."""

    @property
    def kind(self) -> Literal["application", "commit", "proposal"]: ...
    @property
    def sender(self) -> str:
        """Fingerprint (hex) of the sending member."""
    @property
    def data(self) -> bytes:
        """Application plaintext; empty for commits and proposals."""
    @property
    def epoch(self) -> int:
        """Group epoch after processing."""
    @property
    def removed(self) -> bool:
        """True when this commit removed us from the group."""
    @property
    def message_epoch(self) -> int:
        """Epoch the message was sent in (below ``epoch`` for a past-epoch message that
        decrypted from kept secrets)."""
    @property
    def proposal_ref(self) -> bytes:
        """ProposalRef of a proposal (kind "proposal"); empty otherwise."""
    @property
    def covered(self) -> list[bytes]:
        """Refs of the proposals a commit applied by reference (inline ones excluded)."""
    @property
    def added(self) -> list[str]:
        """Fingerprints a commit added."""
    @property
    def removed_members(self) -> list[str]:
        """Fingerprints a commit removed."""
    @property
    def sender_leaf(self) -> int:
        """Leaf index of the sender (0xFFFFFFFF for a sender without a leaf)."""
    @property
    def self_update_only(self) -> bool:
        """A commit with no proposal but Updates (no Add, Remove or extension change)."""
    @property
    def authenticator(self) -> bytes:
        """Epoch authenticator after a commit; empty otherwise."""
    @property
    def committers_changed(self) -> bool:
        """A commit changed the committer list (whoever sent it: policy is the caller's)."""

@final
class KeyPackageInfo:
    @property
    def ciphersuite(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def signature_key(self) -> bytes: ...
    @property
    def not_before(self) -> int: ...
    @property
    def not_after(self) -> int: ...
    @property
    def last_resort(self) -> bool: ...
    @property
    def hash_ref(self) -> bytes: ...

@final
class Group:
    @property
    def group_id(self) -> bytes: ...
    @property
    def epoch(self) -> int: ...
    @property
    def ciphersuite(self) -> int: ...
    @property
    def is_active(self) -> bool: ...
    def members(self) -> list[str]: ...
    def encrypt(self, data: bytes) -> bytes: ...
    def process(self, message: bytes) -> Event: ...
    def add(
        self, key_packages: Sequence[bytes], committers: Sequence[str] | None = None
    ) -> tuple[bytes, bytes]:
        """(commit, welcome); the commit stays pending until ``merge_pending_commit``.

        Like every commit it also covers the queued proposals; with ``committers`` it sets
        the committer list too."""
    def remove(self, fingerprints: Sequence[str], committers: Sequence[str] | None = None) -> bytes:
        """The commit, left pending (see ``add``)."""
    def update(self) -> bytes:
        """The commit, left pending."""
    def leave(self) -> bytes:
        """Propose our own removal (the proposal message); see ``propose_leave``."""
    def commit_pending(self, committers: Sequence[str] | None = None) -> tuple[bytes, bytes | None]:
        """(commit, welcome or None) for the queued proposals (by reference); the commit
        stays pending. Not covered: our own Update proposals (the commit's path renews our
        leaf instead) and any Remove of ourselves (another member must commit it). With ``committers`` (1..255 distinct fingerprints) the commit also
        sets the committer list (a GroupContextExtensions proposal)."""
    def propose_add(self, key_package: bytes) -> tuple[bytes, bytes]:
        """(proposal message, ProposalRef) to add the KeyPackage's owner; any member may.
        The proposal is queued in our own store as well."""
    def propose_remove(self, fingerprint: str) -> tuple[bytes, bytes]:
        """(proposal, ProposalRef) to remove a member (not ourselves: ``propose_leave``)."""
    def propose_update(self) -> tuple[bytes, bytes]:
        """(proposal, ProposalRef) with fresh keys for our leaf."""
    def propose_leave(self) -> tuple[bytes, bytes]:
        """(proposal, ProposalRef) removing ourselves; another member commits it."""
    def pending_proposals(self) -> list[bytes]:
        """Refs of the proposals in the proposal store (ours and received)."""
    def clear_proposals(self) -> None:
        """Empty the proposal store."""
    def committers(self) -> list[str]:
        """Ordered committer list of the group context ([] for a group made before it)."""
    def past_epochs(self) -> list[int]:
        """Epochs whose message secrets are kept, oldest first (at most MAX_PAST_EPOCHS)."""
    def prune_past_epochs(self, keep: int) -> int:
        """Delete the secrets of all but the newest ``keep`` past epochs; how many went."""
    def epoch_authenticator(self) -> bytes:
        """RFC 9420 epoch authenticator: equal on members sharing the same epoch state."""
    def merge_pending_commit(self) -> Event:
        """Apply our pending commit (epoch advances) and describe it as an Event (covered,
        added, removed_members, authenticator ...); NoPendingCommit if none."""
    def clear_pending_commit(self) -> None:
        """Discard our pending commit (stay on the epoch); a no-op if none."""
    def has_pending_commit(self) -> bool: ...
    def export_secret(self, label: str, context: bytes, length: int) -> bytes: ...
    # --- fork (mlsb) ---
    def preview(self, message: bytes) -> Event:
        """``process`` and then undo it: the event it would give, the group unchanged (stage
        a commit without merging it; apply it with ``process``)."""
    def group_info(self) -> bytes:
        """Signed GroupInfo of the current epoch with the ratchet tree and external public
        key, for ``Identity.join_external``. NotAMember once removed."""
    # --- end fork (mlsb) ---

@final
class Identity:
    @staticmethod
    def create(state_dir: str | PathLike[str], secret: bytes, durable: bool = True) -> Identity: ...
    @staticmethod
    def open(state_dir: str | PathLike[str], secret: bytes, durable: bool = True) -> Identity: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def public_key(self) -> bytes: ...
    def sign(self, data: bytes) -> bytes: ...
    def key_package(self, last_resort: bool = False) -> bytes: ...
    def create_group(self, group_id: bytes | None = None) -> Group: ...
    def group(self, group_id: bytes) -> Group: ...
    def join(self, welcome: bytes) -> Group: ...
    def groups(self) -> list[bytes]: ...
    def storage_stats(self) -> dict[str, int]: ...
    # --- fork (mlsb): group-scoped snapshots (issue 14 Stage B) ---
    def snapshot(self, group_id: bytes) -> int:
        """Copy the group's whole MLS state (tree, current and kept past epoch secrets,
        proposal store, own leaf keys, a pending commit) into a durable snapshot; returns
        its id (increasing, never reused). SnapshotLimit at MAX_SNAPSHOTS."""
    def rollback(self, group_id: bytes, snapshot: int) -> int:
        """Put the group back exactly into the snapshot's state in one atomic write (a
        crash leaves the old or the new state); returns the restored epoch. Other groups,
        KeyPackages and all snapshots stay. UnknownSnapshot if absent."""
    def release(self, group_id: bytes, snapshot: int) -> None:
        """Delete a snapshot; UnknownSnapshot if absent."""
    def snapshots(self, group_id: bytes) -> list[tuple[int, int]]:
        """(snapshot id, epoch) of the group's snapshots, oldest first."""
    def snapshot_bytes(self, group_id: bytes) -> int:
        """Plaintext bytes the group's snapshots occupy in the store."""
    def process_readonly(self, group_id: bytes, snapshot: int, message: bytes) -> Event:
        """Decrypt a message with a snapshot's state (e.g. a retained losing-branch head)
        without persisting anything: live group and snapshot stay as they were. Errors are
        those of ``Group.process``, plus UnknownSnapshot."""
    def join_external(self, group_info: bytes) -> tuple[Group, bytes]:
        """Join or rejoin by external commit: (group on the new epoch, commit to send).
        Our old state of the group is replaced (snapshots stay); our old leaf is removed
        by the commit. InvalidMessage for a malformed or unverifiable GroupInfo. Members
        take an external commit only as such a rejoin: one from somebody with no leaf in
        their tree (removed there, or never a member) is InvalidMessage at ``process``."""
    # --- end fork (mlsb) ---

def verify(public_key: bytes, data: bytes, signature: bytes) -> None: ...
def fingerprint_of(public_key: bytes) -> str: ...
def inspect_key_package(key_package: bytes) -> KeyPackageInfo: ...
def key_package_ciphersuite(key_package: bytes) -> int: ...
def key_package_identity(key_package: bytes) -> str: ...
