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
        "/dm abc hi",
        f"/dm {F}",
        "/group",
        "/group create",
        "/group create a b",
        "/group create " + "x" * 65,
        "/group invite team notafpr",
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
