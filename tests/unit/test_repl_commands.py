import pytest

from qpc_node.repl import commands as c
from qpc_node.repl.commands import UsageError, parse

F = "ab" * 32


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
    ],
)
def test_tab_completion(before: str, want: list[str]) -> None:
    assert c.completions(before, ["alice", "bob", "bobby"]) == want


def test_completer_yields_prompt_toolkit_completions() -> None:
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from qpc_node.repl.interactive import ReplCompleter

    got = list(ReplCompleter(lambda: ["bob"]).get_completions(Document("/dm b"), CompleteEvent()))
    assert [(x.text, x.start_position) for x in got] == [("bob", -1)]
