"""Copy the C library and dynamic loader a PyInstaller one-dir bundle needs into it.

Usage: python bundle_libc.py BUNDLE_DIR   (prints the loader's file name)

PyInstaller deliberately leaves out libc, libm, libpthread, libdl and the loader, so
a one-dir bundle still depends on the host's glibc. This closes the NEEDED graph of
every ELF in the bundle with libraries from the build system and copies them into
BUNDLE_DIR/_internal, together with the program interpreter (PT_INTERP) of the
bootloader. Launched as ``_internal/ld-*.so --library-path _internal qpc``, the
bundle then needs nothing from the machine it runs on (an OpenWrt musl router, a
busybox-only root) — and, unlike staticx, nothing is unpacked at start.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ELF_MAGIC = b"\x7fELF"


def is_elf(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def readelf(*args: str) -> str:
    return subprocess.run(
        ["readelf", "-W", *args], check=True, capture_output=True, text=True
    ).stdout


def needed(p: Path) -> list[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", readelf("-d", str(p)))


def interpreter(p: Path) -> str:
    m = re.search(r"Requesting program interpreter: ([^\]]+)\]", readelf("-l", str(p)))
    if not m:
        raise SystemExit(f"{p}: no PT_INTERP (static bootloader?)")
    return m.group(1)


def search_dirs() -> list[Path]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/lib/{multiarch}", f"/usr/lib/{multiarch}", "/lib", "/usr/lib", "/lib64"]
    return [Path(d) for d in dirs if Path(d).is_dir()]


def main(bundle: Path) -> str:
    internal = bundle / "_internal"
    boot = bundle / "qpc"
    elves = [boot, *(p for p in internal.rglob("*") if p.is_file() and is_elf(p))]
    present = {p.name for p in internal.iterdir()}
    interp = Path(interpreter(boot))
    dirs = search_dirs()
    todo = [n for e in elves for n in needed(e)]
    copied: list[str] = []
    while todo:
        name = todo.pop()
        if name in present:
            continue
        src = next((d / name for d in dirs if (d / name).exists()), None)
        if src is None:
            raise SystemExit(f"bundle_libc: {name} not found in {', '.join(map(str, dirs))}")
        dst = internal / name
        shutil.copy2(src.resolve(), dst)
        os.chmod(dst, 0o755)
        present.add(name)
        copied.append(name)
        todo.extend(needed(dst))
    if interp.name not in present:
        shutil.copy2(interp.resolve(), internal / interp.name)
        os.chmod(internal / interp.name, 0o755)
        copied.append(interp.name)
    print(f"bundle_libc: added {', '.join(sorted(copied)) or 'nothing'}", file=sys.stderr)
    return interp.name


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(main(Path(sys.argv[1])))
