import pytest
import zxingcpp

from qpc_node.client.fingerprint import QR_SCHEME, grouped, normalize, qr_terminal, short_code
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


# A terminal cell holds two module rows; the glyph is drawn in the foreground colour,
# which is light on the dark terminals the code is meant for: (upper, lower) is light?
_HALVES = {"█": (True, True), "▀": (True, False), "▄": (False, True), " ": (False, False)}
SCALE = 4  # pixels per module


def _scan(rendered: str) -> str | None:
    """What a phone would read off the screen: the block characters turned back into
    modules, drawn as a grayscale image and decoded by an independent decoder (zxing-cpp)."""
    rows: list[list[bool]] = []
    for line in rendered.splitlines():
        cells = [_HALVES[ch] for ch in line]  # KeyError: a glyph we don't know how to draw
        rows += [[upper for upper, _ in cells], [lower for _, lower in cells]]
    width = len(rows[0])
    assert all(len(r) == width for r in rows)
    pixels = bytearray()
    for row in rows:
        line = b"".join((b"\xff" if light else b"\x00") * SCALE for light in row)
        pixels += line * SCALE
    image = memoryview(pixels).cast("B", (len(rows) * SCALE, width * SCALE))
    # No inverted retry: light and dark must be the right way round, as on the screen.
    found = zxingcpp.read_barcode(image, formats=zxingcpp.BarcodeFormat.QRCode, try_invert=False)
    return None if found is None else found.text


@pytest.mark.parametrize("fpr", [FPR, "f" * 64, bytes(range(32)).hex()])
def test_qr_scans_back_to_the_address(fpr: str) -> None:
    assert _scan(qr_terminal(fpr)) == QR_SCHEME + fpr
    # What people type or paste is read the same way.
    assert _scan(qr_terminal(grouped(fpr).upper())) == QR_SCHEME + fpr


def test_a_damaged_rendering_does_not_scan() -> None:
    """The decoder is not fooled by anything block-shaped: blank out the top two
    finder patterns (the top 6 text lines hold them) and nothing is read."""
    lines = qr_terminal(FPR).splitlines()
    blank = ["█" * len(lines[0])] * 6
    assert _scan("\n".join(blank + lines[6:])) is None
