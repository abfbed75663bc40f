"""Drop a DT_NEEDED entry from an ELF shared object that uses nothing of that library.

Usage: python drop_needed.py LIB FILE...   (prints what it did per FILE; exit 1 on refusal)

PyPI's protobuf wheel links its upb module (google/_upb/_message.abi3.so) with the C++
driver, so it NEEDs libstdc++.so.6 although upb is C and binds no symbol of it. Because
of that one entry PyInstaller carries libstdc++ (2.1 MiB, 0.72 MiB of the .ipk, and
~0.9 MiB of a node's RSS, mapped at every start). This removes the entry in place — what
``patchelf --remove-needed`` does: the .dynamic entries after it move up one slot and a
DT_NULL ends the table — but only when it is provably unused:

- no symbol version of FILE's DT_VERNEED table names LIB (a GLIBCXX_* / CXXABI_* reference);
- every undefined, non-weak dynamic symbol is versioned against another library, or is
  CPython's C API (``Py*`` / ``_Py*``, bound to the interpreter that loads the module).

Anything else (an unversioned foreign symbol, a C++ name) is a refusal, not a guess. A
FILE that does not NEED LIB is left alone (the build venv is reused across builds).
Little-endian ELF32/ELF64 only: x86_64, aarch64 and armv7 (the arches cross/ builds).
"""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB = 0, 1, 5


class Refused(Exception):
    """FILE may use LIB (or is not an ELF this tool edits): it is left untouched."""


def _layout(data: bytes) -> tuple[str, int, list[tuple[int, int, int, int]]]:
    """(struct format of one dynamic entry, its size, [(p_type, offset, vaddr, filesz)])."""
    if data[:4] != b"\x7fELF":
        raise Refused("not an ELF file")
    if data[5] != 1:
        raise Refused("big-endian ELF is not handled")
    if data[4] == 2:  # ELF64
        phoff = struct.unpack_from("<Q", data, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        phdrs = []
        for i in range(phnum):
            p_type, _flags, off, vaddr, _paddr, filesz = struct.unpack_from(
                "<IIQQQQ", data, phoff + i * phentsize
            )
            phdrs.append((p_type, off, vaddr, filesz))
        return "<qQ", 16, phdrs
    if data[4] == 1:  # ELF32
        phoff = struct.unpack_from("<I", data, 0x1C)[0]
        phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
        phdrs = []
        for i in range(phnum):
            p_type, off, vaddr, _paddr, filesz = struct.unpack_from(
                "<IIIII", data, phoff + i * phentsize
            )
            phdrs.append((p_type, off, vaddr, filesz))
        return "<iI", 8, phdrs
    raise Refused("unknown ELF class")


def _dynamic(data: bytes) -> tuple[int, str, int, list[tuple[int, int]], int]:
    """(offset of .dynamic, entry format, entry size, entries before DT_NULL, slots)."""
    fmt, size, phdrs = _layout(data)
    dyn = [p for p in phdrs if p[0] == PT_DYNAMIC]
    if not dyn:
        raise Refused("no PT_DYNAMIC")
    _, off, _, filesz = dyn[0]
    entries: list[tuple[int, int]] = []
    for i in range(filesz // size):
        tag, val = struct.unpack_from(fmt, data, off + i * size)
        if tag == DT_NULL:
            break
        entries.append((tag, val))
    return off, fmt, size, entries, filesz // size


def _dynstr(data: bytes, entries: list[tuple[int, int]]) -> int:
    """File offset of the dynamic string table (DT_STRTAB is a vaddr: map it via PT_LOAD)."""
    strtab = next((v for t, v in entries if t == DT_STRTAB), None)
    if strtab is None:
        raise Refused("no DT_STRTAB")
    for p_type, off, vaddr, filesz in _layout(data)[2]:
        if p_type == PT_LOAD and vaddr <= strtab < vaddr + filesz:
            return strtab - vaddr + off
    raise Refused("DT_STRTAB outside every PT_LOAD")


def _string(data: bytes, at: int) -> str:
    return data[at : data.index(b"\0", at)].decode()


def needed(data: bytes) -> list[str]:
    """The DT_NEEDED names, in order."""
    entries = _dynamic(data)[3]
    base = _dynstr(data, entries)
    return [_string(data, base + v) for t, v in entries if t == DT_NEEDED]


def check_unused(path: Path, lib: str) -> None:
    """Raise Refused unless readelf shows that nothing in PATH binds to LIB."""
    out = subprocess.run(
        ["readelf", "-W", "-V", "--dyn-syms", str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if re.search(rf"File: {re.escape(lib)}\b", out):
        raise Refused(f"{path.name} has symbol versions of {lib}")
    foreign = []
    for line in out.splitlines():
        cols = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(cols) < 8 or cols[6] != "UND" or cols[4] == "WEAK":
            continue
        name = cols[7]
        if "@" in name or name.startswith(("Py", "_Py")):
            continue
        foreign.append(name)
    if foreign:
        raise Refused(f"{path.name}: unversioned undefined symbols {foreign[:5]}")


def drop_needed(path: Path, lib: str) -> bool:
    """Remove LIB from PATH's DT_NEEDED; False when PATH does not need it."""
    raw = path.read_bytes()
    if lib not in needed(raw):
        return False
    check_unused(path, lib)
    off, fmt, size, entries, _ = _dynamic(raw)
    base = _dynstr(raw, entries)
    kept = [(t, v) for t, v in entries if not (t == DT_NEEDED and _string(raw, base + v) == lib)]
    data = bytearray(raw)
    for i, (tag, val) in enumerate([*kept, (DT_NULL, 0)]):
        struct.pack_into(fmt, data, off + i * size, tag, val)
    path.write_bytes(bytes(data))
    return True


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    lib, files = argv[0], [Path(a) for a in argv[1:]]
    rc = 0
    for f in files:
        try:
            print(f"drop_needed: {f}: {'dropped' if drop_needed(f, lib) else 'not needed'} {lib}")
        except Refused as e:
            print(f"drop_needed: refused: {e}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
