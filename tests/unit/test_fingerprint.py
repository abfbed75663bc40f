import pytest

from qpc_node.client.fingerprint import grouped, normalize, qr_terminal, short_code
from qpc_node.errors import LocalProtocolError

FPR = "0123456789abcdef" * 4


def test_grouped_and_short() -> None:
    g = grouped(FPR)
    assert g.split() == [FPR[i : i + 4] for i in range(0, 64, 4)]
    assert short_code(FPR) == "0123-4567"


def test_normalize_accepts_human_forms() -> None:
    assert normalize("qpc:" + FPR.upper()) == FPR
    assert normalize(grouped(FPR)) == FPR


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, FPR + "0"])
def test_normalize_rejects(bad: str) -> None:
    with pytest.raises(LocalProtocolError):
        normalize(bad)


def test_qr_has_many_rows() -> None:
    qr = qr_terminal(FPR)
    assert len(qr.splitlines()) > 10
