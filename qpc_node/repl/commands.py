"""REPL command grammar (sans-IO): a line in, a typed command or a usage error out.

Kept apart from prompt_toolkit and the client so every form of bad input can be
tested without a terminal, and so script mode and interactive mode parse alike.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

import msgspec

from qpc_node.client.channels import parse_secret
from qpc_node.client.contacts import looks_like_peer, valid_name
from qpc_node.client.fingerprint import normalize
from qpc_node.errors import LocalProtocolError


class UsageError(LocalProtocolError):
    """Bad command or arguments; ``usage`` is the line to show."""

    def __init__(self, message: str, usage: str = "") -> None:
        super().__init__(message)
        self.usage = usage


class Help(msgspec.Struct, frozen=True):
    topic: str = ""


class WhoAmI(msgspec.Struct, frozen=True):
    pass


class Dm(msgspec.Struct, frozen=True):
    peer: str
    text: str


class GroupCreate(msgspec.Struct, frozen=True):
    name: str


class GroupInvite(msgspec.Struct, frozen=True):
    name: str
    peer: str


class GroupSend(msgspec.Struct, frozen=True):
    name: str
    text: str


class GroupMembers(msgspec.Struct, frozen=True):
    name: str


class GroupLeave(msgspec.Struct, frozen=True):
    name: str


class GroupInfo(msgspec.Struct, frozen=True):
    name: str


class GroupUpdate(msgspec.Struct, frozen=True):
    name: str


class GroupRemove(msgspec.Struct, frozen=True):
    name: str
    peer: str


class Inbox(msgspec.Struct, frozen=True):
    wait: float = 0.0


class Verify(msgspec.Struct, frozen=True):
    peer: str


class Stats(msgspec.Struct, frozen=True):
    pass


class MeshView(msgspec.Struct, frozen=True):
    what: str  # "peers" | "routes"


class MeshTrust(msgspec.Struct, frozen=True):
    fingerprint: str  # a node id or a unique hex prefix (the node resolves it)


class MeshServer(msgspec.Struct, frozen=True):
    target: str  # host:port of a node in the peer list, or a node fingerprint / prefix


class MeshAuto(msgspec.Struct, frozen=True):
    pass


class ContactAdd(msgspec.Struct, frozen=True):
    name: str
    peer: str


class ContactRemove(msgspec.Struct, frozen=True):
    name: str


class Contacts(msgspec.Struct, frozen=True):
    pass


class ChannelCreate(msgspec.Struct, frozen=True):
    name: str


class ChannelJoin(msgspec.Struct, frozen=True):
    name: str
    secret: bytes


class ChannelList(msgspec.Struct, frozen=True):
    pass


class ChannelLeave(msgspec.Struct, frozen=True):
    name: str


class Broadcast(msgspec.Struct, frozen=True):
    channel: str
    text: str


class Quit(msgspec.Struct, frozen=True):
    pass


Command = (
    Help
    | WhoAmI
    | Dm
    | GroupCreate
    | GroupInvite
    | GroupSend
    | GroupMembers
    | GroupLeave
    | GroupRemove
    | GroupInfo
    | GroupUpdate
    | Inbox
    | Verify
    | Stats
    | MeshView
    | MeshTrust
    | MeshServer
    | MeshAuto
    | ContactAdd
    | ContactRemove
    | Contacts
    | ChannelCreate
    | ChannelJoin
    | ChannelList
    | ChannelLeave
    | Broadcast
    | Quit
)

USAGE: dict[str, str] = {
    "help": "/help [COMMAND]",
    "whoami": "/whoami",
    "dm": "/dm WHO TEXT   (also /mesh dm WHO TEXT; WHO: fingerprint, contact name or short code)",
    "mesh": "/mesh peers|routes|auto|server ADDR|NODE|dm WHO TEXT|broadcast CHANNEL TEXT"
    "|trust NODE_FPR",
    "mesh broadcast": "/mesh broadcast CHANNEL TEXT   (to every member of a joined channel)",
    "channel": "/channel create|join|list|leave [NAME [SECRET]]",
    "channel create": "/channel create NAME   (prints the secret to share, text and QR)",
    "channel join": "/channel join NAME SECRET   (SECRET: qpcch:... from its creator)",
    "channel list": "/channel list",
    "channel leave": "/channel leave NAME   (forgets the secret)",
    "mesh server": "/mesh server HOST:PORT|NODE-FINGERPRINT   (a node from /mesh peers)",
    "mesh auto": "/mesh auto   (move to the reachable node with the lowest RTT)",
    "contact": "/contact add NAME WHO | /contact remove NAME",
    "contact add": "/contact add NAME FINGERPRINT|SHORT-CODE",
    "contact remove": "/contact remove NAME",
    "contacts": "/contacts",
    "group": "/group create|invite|send|members|info|update|leave|remove NAME [WHO|TEXT]",
    "group create": "/group create NAME",
    "group invite": "/group invite NAME WHO",
    "group send": "/group send NAME TEXT",
    "group members": "/group members NAME",
    "group leave": "/group leave NAME",
    "group info": "/group info NAME",
    "group update": "/group update NAME",
    "group remove": "/group remove NAME WHO",
    "inbox": "/inbox [--wait SECONDS]",
    "verify": "/verify WHO",
    "stats": "/stats",
    "quit": "/quit",
}
MAX_WAIT = 3600.0
MAX_NAME = 64


def _fpr(s: str, usage: str) -> str:
    """A user reference: a fingerprint (normalized here) or a contact name / short code,
    kept as typed for the REPL to resolve against what it knows."""
    try:
        return normalize(s)
    except LocalProtocolError as exc:
        if looks_like_peer(s):
            return s
        raise UsageError(f"{exc}, nor a contact name or short code", usage) from None


def _name(s: str, usage: str) -> str:
    if not s or len(s) > MAX_NAME or any(c.isspace() or not c.isprintable() for c in s):
        raise UsageError(f"group name must be 1-{MAX_NAME} printable chars, no spaces", usage)
    return s


def _split_rest(rest: str, n: int) -> list[str]:
    """Split off ``n`` leading words; the remainder (free text) stays verbatim."""
    out: list[str] = []
    s = rest.lstrip()
    for _ in range(n):
        word, _, s = s.partition(" ")
        out.append(word)
        s = s.lstrip()
    out.append(s)
    return out


def parse(line: str) -> Command | None:
    """Parse one REPL line. Empty lines and ``#`` comments give None."""
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    if not s.startswith("/"):
        raise UsageError("commands start with '/'; try /help", USAGE["help"])
    head, _, rest = s[1:].partition(" ")
    head = head.lower()
    if head == "mesh":
        sub, _, rest2 = rest.strip().partition(" ")
        sub = sub.lower()
        if sub == "dm":
            head, rest = "dm", rest2
        elif sub == "broadcast":
            name, text = _split_rest(rest2, 1)
            if not name or not text:
                raise UsageError("need a channel name and a text", USAGE["mesh broadcast"])
            return Broadcast(_channel_name(name, USAGE["mesh broadcast"]), text)
        elif sub in ("peers", "routes", "auto"):
            if rest2.strip():
                raise UsageError(f"/mesh {sub} takes no arguments", USAGE["mesh"])
            return MeshAuto() if sub == "auto" else MeshView(sub)
        elif sub == "trust":
            fpr = rest2.strip()
            if not fpr or " " in fpr:
                raise UsageError("/mesh trust takes one node fingerprint", USAGE["mesh"])
            return MeshTrust(fpr)
        elif sub == "server":
            args = rest2.split()
            if len(args) != 1:
                raise UsageError("need one node address or fingerprint", USAGE["mesh server"])
            return MeshServer(args[0])
        else:
            raise UsageError(f"unknown /mesh command {sub!r}", USAGE["mesh"])
    if head == "help":
        return Help(rest.strip())
    if head in ("whoami", "stats", "quit", "exit"):
        if rest.strip():
            raise UsageError(f"/{head} takes no arguments", USAGE.get(head, "/quit"))
        if head == "whoami":
            return WhoAmI()
        return Stats() if head == "stats" else Quit()
    if head == "dm":
        peer, text = _split_rest(rest, 1)
        if not peer or not text:
            raise UsageError("need a fingerprint and a text", USAGE["dm"])
        return Dm(_fpr(peer, USAGE["dm"]), text)
    if head == "verify":
        args = rest.split()
        if len(args) != 1:
            raise UsageError("need one fingerprint", USAGE["verify"])
        return Verify(_fpr(args[0], USAGE["verify"]))
    if head == "inbox":
        return _inbox(rest)
    if head == "contacts":
        if rest.strip():
            raise UsageError("/contacts takes no arguments", USAGE["contacts"])
        return Contacts()
    if head == "contact":
        return _contact(rest)
    if head == "group":
        return _group(rest)
    if head == "channel":
        return _channel(rest)
    raise UsageError(f"unknown command /{head}; try /help", USAGE["help"])


def _channel_name(s: str, usage: str) -> str:
    """A channel's local name; ``#news`` and ``news`` are the same channel."""
    name = s.removeprefix("#")
    if not name or len(name) > MAX_NAME or any(c.isspace() or not c.isprintable() for c in name):
        raise UsageError(f"channel name must be 1-{MAX_NAME} printable chars, no spaces", usage)
    return name


def _channel(rest: str) -> Command:
    sub, _, rest = rest.strip().partition(" ")
    sub = sub.lower()
    usage = USAGE.get(f"channel {sub}", USAGE["channel"])
    args = rest.split()
    if sub == "list":
        if args:
            raise UsageError("/channel list takes no arguments", usage)
        return ChannelList()
    if sub in ("create", "leave"):
        if len(args) != 1:
            raise UsageError("need one channel name", usage)
        name = _channel_name(args[0], usage)
        return ChannelCreate(name) if sub == "create" else ChannelLeave(name)
    if sub == "join":
        if len(args) != 2:
            raise UsageError("need a channel name and its secret", usage)
        try:
            secret = parse_secret(args[1])
        except LocalProtocolError as exc:
            raise UsageError(str(exc), usage) from None
        return ChannelJoin(_channel_name(args[0], usage), secret)
    raise UsageError(f"unknown /channel command {sub!r}", USAGE["channel"])


def _contact(rest: str) -> Command:
    sub, _, rest = rest.strip().partition(" ")
    sub = sub.lower()
    usage = USAGE.get(f"contact {sub}", USAGE["contact"])
    args = rest.split()
    if sub == "add":
        if len(args) != 2:
            raise UsageError("need a name and a fingerprint", usage)
        if not valid_name(args[0]):
            raise UsageError("a contact name is 1-32 letters, digits, _ . -", usage)
        return ContactAdd(args[0], _fpr(args[1], usage))
    if sub == "remove":
        if len(args) != 1:
            raise UsageError("need one contact name", usage)
        return ContactRemove(args[0])
    raise UsageError(f"unknown /contact command {sub!r}", USAGE["contact"])


def _inbox(rest: str) -> Inbox:
    try:
        args = shlex.split(rest)
    except ValueError as exc:
        raise UsageError(str(exc), USAGE["inbox"]) from None
    if not args:
        return Inbox()
    if len(args) == 2 and args[0] == "--wait":
        try:
            wait = float(args[1])
        except ValueError:
            raise UsageError("--wait takes seconds", USAGE["inbox"]) from None
        if not 0 <= wait <= MAX_WAIT:
            raise UsageError(f"--wait must be within 0..{MAX_WAIT:.0f}", USAGE["inbox"])
        return Inbox(wait)
    raise UsageError("unexpected arguments", USAGE["inbox"])


def _group(rest: str) -> Command:
    sub, _, rest = rest.strip().partition(" ")
    sub = sub.lower()
    usage = USAGE.get(f"group {sub}", USAGE["group"])
    one: dict[str, type[GroupCreate | GroupMembers | GroupLeave | GroupInfo | GroupUpdate]] = {
        "create": GroupCreate,
        "members": GroupMembers,
        "leave": GroupLeave,
        "info": GroupInfo,
        "update": GroupUpdate,
    }
    if sub in one:
        args = rest.split()
        if len(args) != 1:
            raise UsageError("need one group name", usage)
        return one[sub](_name(args[0], usage))
    if sub in ("invite", "remove"):
        args = rest.split()
        if len(args) != 2:
            raise UsageError("need a group name and a fingerprint", usage)
        name, peer = _name(args[0], usage), _fpr(args[1], usage)
        return GroupInvite(name, peer) if sub == "invite" else GroupRemove(name, peer)
    if sub == "send":
        name, text = _split_rest(rest, 1)
        if not name or not text:
            raise UsageError("need a group name and a text", usage)
        return GroupSend(_name(name, usage), text)
    raise UsageError(f"unknown /group command {sub!r}", USAGE["group"])


COMMANDS = (
    "/help",
    "/whoami",
    "/dm",
    "/group",
    "/inbox",
    "/verify",
    "/contact",
    "/contacts",
    "/channel",
    "/mesh",
    "/stats",
    "/quit",
)
SUBCOMMANDS = {
    "/group": ("create", "invite", "send", "members", "info", "update", "leave", "remove"),
    "/contact": ("add", "remove"),
    "/mesh": ("peers", "routes", "server", "auto", "dm", "broadcast", "trust"),
    "/channel": ("create", "join", "list", "leave"),
}
# Which word (0 = the command) names a user, by command and subcommand.
_PEER_WORD = {
    ("/dm", ""): 1,
    ("/verify", ""): 1,
    ("/mesh", "dm"): 2,
    ("/group", "invite"): 3,
    ("/group", "remove"): 3,
    ("/contact", "remove"): 2,
}


# Which word names a joined channel, by command and subcommand.
_CHANNEL_WORD = {("/mesh", "broadcast"): 2, ("/channel", "leave"): 2}


def completions(before: str, names: list[str], channels: Sequence[str] = ()) -> list[str]:
    """Words that complete the last word of ``before`` (the line up to the cursor):
    commands, subcommands, contact names where a command takes a user, and joined
    channel names where it takes a channel."""
    words = before.split(" ")
    last = words[-1]
    if len(words) == 1:
        return [w for w in COMMANDS if w.startswith(last.lower())]
    head = words[0].lower()
    if len(words) == 2 and head in SUBCOMMANDS:
        return [w for w in SUBCOMMANDS[head] if w.startswith(last.lower())]
    sub = words[1].lower() if head in SUBCOMMANDS else ""
    if _PEER_WORD.get((head, sub)) == len(words) - 1:
        return [n for n in names if n.startswith(last)]
    if _CHANNEL_WORD.get((head, sub)) == len(words) - 1:
        return [n for n in channels if n.startswith(last.removeprefix("#"))]
    return []
