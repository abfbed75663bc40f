import pytest

from qpc_node.client.channels import secret_text
from qpc_node.repl import commands as c
from qpc_node.repl.commands import UsageError, parse

F = "ab" * 32
SECRET = bytes(range(32))
SECRET_TEXT = secret_text(SECRET)


@pytest.mark.parametrize(
    ("line", "want"),
    [
        ("", None),
        ("   # comment", None),
        ("/help", c.Help("")),
        ("/help dm", c.Help("dm")),
        ("/whoami", c.WhoAmI()),
        (f"/dm {F} hello  world ", c.Dm(F, "hello  world")),
        (f"/mesh dm {F.upper()} hi", c.Dm(F, "hi")),
        ("/group create team", c.GroupCreate("team")),
        (f"/group invite team {F}", c.GroupInvite("team", F)),
        ("/group send team hi all", c.GroupSend("team", "hi all")),
        ("/group members team", c.GroupMembers("team")),
        ("/group leave team", c.GroupLeave("team")),
        (f"/group remove team {F}", c.GroupRemove("team", F)),
        ("/group info team", c.GroupInfo("team")),
        ("/group update team", c.GroupUpdate("team")),
        ("/inbox", c.Inbox()),
        ("/inbox --wait 2.5", c.Inbox(2.5)),
        (f"/verify {F}", c.Verify(F)),
        ("/stats", c.Stats()),
        ("/mesh peers", c.MeshView("peers")),
        ("/mesh ROUTES", c.MeshView("routes")),
        ("/mesh trust 0a1b2c", c.MeshTrust("0a1b2c")),
        (f"/mesh trust {F}", c.MeshTrust(F)),
        ("/dm bob hi", c.Dm("bob", "hi")),
        ("/dm abcd-ef01 hi", c.Dm("abcd-ef01", "hi")),
        ("/group invite team alice", c.GroupInvite("team", "alice")),
        ("/verify bob", c.Verify("bob")),
        (f"/contact add bob {F}", c.ContactAdd("bob", F)),
        ("/contact add bob abcd", c.ContactAdd("bob", "abcd")),
        ("/contact remove bob", c.ContactRemove("bob")),
        ("/contacts", c.Contacts()),
        ("/mesh server [::1]:4433", c.MeshServer("[::1]:4433")),
        ("/mesh server abcd1234", c.MeshServer("abcd1234")),
        ("/mesh auto", c.MeshAuto()),
        ("/quit", c.Quit()),
        ("/exit", c.Quit()),
        ("/channel create news", c.ChannelCreate("news")),
        ("/channel create #news", c.ChannelCreate("news")),
        (f"/channel join town {SECRET_TEXT}", c.ChannelJoin("town", SECRET)),
        (f"/channel join town {SECRET_TEXT.upper()}", c.ChannelJoin("town", SECRET)),
        ("/channel list", c.ChannelList()),
        ("/channel leave #town", c.ChannelLeave("town")),
        (
            "/mesh broadcast news the bridge  is closed",
            c.Broadcast("news", "the bridge  is closed"),
        ),
        ("/mesh broadcast #news hi", c.Broadcast("news", "hi")),
    ],
)
def test_parses(line: str, want: object) -> None:
    assert parse(line) == want


@pytest.mark.parametrize(
    "line",
    [
        "hello",
        "/nope",
        "/dm",
        "/dm a/b hi",
        "/contact add",
        "/contact add bob",
        f"/contact add {F} {F}",
        "/contact add b!b abcd",
        "/contact frob",
        "/contacts all",
        "/mesh server",
        "/mesh server a b",
        "/mesh auto now",
        f"/dm {F}",
        "/group",
        "/group create",
        "/group create a b",
        "/group create " + "x" * 65,
        "/group invite team not*a*name",
        "/group send team",
        "/group frob x",
        "/group info",
        "/group info a b",
        "/inbox --wait",
        "/inbox --wait -1",
        "/inbox --wait soon",
        "/inbox 'unterminated",
        "/whoami extra",
        "/mesh fly",
        "/mesh peers now",
        "/mesh trust",
        "/mesh trust ab cd",
        "/verify",
        "/channel",
        "/channel create",
        "/channel create a b",
        "/channel create #",
        "/channel join town",
        "/channel join town qpcch:abc",
        f"/channel join town {SECRET_TEXT[6:]}",
        "/channel list x",
        "/channel leave",
        "/channel frob x",
        "/mesh broadcast",
        "/mesh broadcast news",
    ],
)
def test_bad_input_is_usage_error_with_usage(line: str) -> None:
    with pytest.raises(UsageError) as ei:
        parse(line)
    assert ei.value.usage.startswith("/")


def test_random_lines_never_crash() -> None:
    import random

    rng = random.Random(3)
    alphabet = "/ abcdefgmrsuv-0123456789'\"\t\x00é"
    for _ in range(3000):
        line = "/" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(30)))
        try:
            parse(line)
        except UsageError as exc:
            assert exc.usage


@pytest.mark.parametrize(
    ("before", "want"),
    [
        ("/d", ["/dm"]),
        ("/con", ["/contact", "/contacts"]),
        ("/mesh s", ["server"]),
        ("/dm b", ["bob", "bobby"]),
        ("/dm ", ["alice", "bob", "bobby"]),
        ("/mesh dm al", ["alice"]),
        ("/group invite team bo", ["bob", "bobby"]),
        ("/group send team bo", []),  # free text, not a user
        ("/dm bob he", []),
        ("/contact remove a", ["alice"]),
        ("/ch", ["/channel"]),
        ("/channel l", ["list", "leave"]),
        ("/mesh b", ["broadcast"]),
        ("/mesh broadcast ", ["news", "town"]),
        ("/mesh broadcast #n", ["news"]),
        ("/channel leave t", ["town"]),
        ("/mesh broadcast news bo", []),  # free text
        ("/channel join ", []),  # a new name
    ],
)
def test_tab_completion(before: str, want: list[str]) -> None:
    assert c.completions(before, ["alice", "bob", "bobby"], ["news", "town"]) == want


def test_completer_yields_prompt_toolkit_completions() -> None:
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from qpc_node.repl.interactive import ReplCompleter

    got = list(ReplCompleter(lambda: ["bob"]).get_completions(Document("/dm b"), CompleteEvent()))
    assert [(x.text, x.start_position) for x in got] == [("bob", -1)]
