"""The atheris harness (tests/fuzz/atheris_parser.py, a command) stays runnable: its check function on the
seeds and on known-bad inputs, and a few hundred coverage-guided runs of the real command."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from fuzz.atheris_parser import SEEDS, check

HARNESS = Path(__file__).with_name("atheris_parser.py")


@pytest.mark.parametrize("data", [*SEEDS, b"", b"\x00", b"\x00{", b"\x01" + b"[" * 300 + b"]" * 300,
                                  b'\x00{"model":"m","messages":[{"role":"u","content":[{"type":"x","y":'
                                  + b"[" * 260 + b"]" * 260 + b"}]}]}", b"\x02\xff\xfe"])  # fmt: skip
def test_check_accepts_seeds_and_clean_rejections(data: bytes) -> None:
    check(data)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_the_fuzzing_command_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(HARNESS), "-runs=300", "-seed=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Done 300 runs" in result.stderr
    assert not list(tmp_path.glob("crash-*"))
