"""bench/pairs.py: alternated before/after runs of one bench from two trees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import pairs

FAKE = """import pathlib, sys
built = pathlib.Path("build.bin")
print("noise line without figures")
print(f"fake figure={VALUE} other_ms={VALUE}.5 copied={int(built.exists())}")
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.email=t@example.org", "-c", "user.name=t", *args],
        check=True,
        capture_output=True,
    )


def test_figures_names_are_the_text_before_each_value() -> None:
    out = pairs.figures(
        "rpc p99 ratio ref/qpc=1.75 (qpc p99_ms=28.6)\n"
        "node msgs_per_s=2296 cpu_ms_per_msg=0.308\n"
        "rpc calls/s ratio=1.7\nrpc calls/s ratio=2.03\n"
    )
    assert out == {
        "rpc p99 ratio ref/qpc": 1.75,
        "qpc p99_ms": 28.6,
        "node msgs_per_s": 2296.0,
        "cpu_ms_per_msg": 0.308,
        "rpc calls/s ratio": 2.03,  # the later line wins
    }


def test_pairs_alternate_two_trees_and_remove_the_worktree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "bench" / "fake.py").write_text(FAKE.replace("VALUE", "1"))
    _git(repo, "add", "bench/fake.py")
    _git(repo, "commit", "-q", "-m", "before")
    (repo / "bench" / "fake.py").write_text(FAKE.replace("VALUE", "2"))  # uncommitted: "after"
    (repo / "build.bin").write_bytes(b"built, not in git")

    rc = pairs.main(
        ["--base", "HEAD", "--pairs", "3", "--repo", str(repo), "--copy", "build.bin",
         "--timeout", "60", "--", "bench/fake.py"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    order = [line.split()[2] for line in out.splitlines() if line.startswith("pair ")]
    assert order == ["before", "after", "after", "before", "before", "after"]
    assert "fake figure: before 1 / 1 / 1 (median 1); after 2 / 2 / 2 (median 2)" in out
    assert "other_ms: before 1.5 / 1.5 / 1.5 (median 1.5); after 2.5 / 2.5 / 2.5" in out
    assert "copied: before 1 / 1 / 1 (median 1)" in out  # --copy reached the worktree
    listed = subprocess.run(
        ["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert len(listed.splitlines()) == 1, listed  # the base worktree is gone


def test_a_failing_bench_stops_the_series_and_still_removes_the_worktree(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "bench" / "fake.py").write_text("raise SystemExit(3)\n")
    _git(repo, "add", "bench/fake.py")
    _git(repo, "commit", "-q", "-m", "broken")
    with pytest.raises(SystemExit, match="exit 3"):
        pairs.main(["--base", "HEAD", "--repo", str(repo), "--copy", "bench/fake.py",
                    "--", "bench/fake.py"])  # fmt: skip
    listed = subprocess.run(
        ["git", "-C", str(repo), "worktree", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert len(listed.splitlines()) == 1, listed
