"""A short end-to-end `epp demo` run: every process starts and stops, and the table's numbers are sane.
(Whether the picker wins is the routing benchmark's question, not this test's.) `epp demo` and `epp sim`
are the lab's (`epp_lab.demo`, `epp_lab.sim.cli`), reached through the `epp` command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from epp_lab import envoy_launcher
from epp_lab.envoy_launcher import LaunchError

pytestmark = pytest.mark.envoy


def test_short_demo_prints_a_sane_table_and_writes_results(tmp_path) -> None:
    out = tmp_path / "demo"
    # Every child's files (ready files, logs, Envoy configs) live under this TMPDIR, so a leftover child is
    # one whose command line names it.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "epp.cli", "demo", "--duration-s", "6", "--qps", "4", "--groups", "4",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "round-robin" in run.stdout and "epp" in run.stdout and "TTFT p90" in run.stdout
    assert "| arm |" in run.stdout  # the summary is a markdown table
    results = json.loads((out / "results.json").read_text())
    arms = {row["arm"]: row for row in results["arms"]}
    assert set(arms) == {"round-robin", "epp"}
    for row in arms.values():
        assert row["requests"] == 24 and row["errors"] == 0
        assert 0 < row["ttft_p50_s"] <= row["ttft_p90_s"] and math.isfinite(row["ttft_p90_s"])
        assert 0 <= row["hit_rate"] <= 1 and row["output_tok_s"] > 0
    assert (out / "ttft.png").read_bytes().startswith(b"\x89PNG")
    # No child process outlived the demo.
    leftovers = subprocess.run(["pgrep", "-a", "-f", str(scratch)], capture_output=True, text=True)
    assert leftovers.stdout == ""


def test_missing_envoy_is_a_clear_message(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(envoy_launcher.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match="envoy binary was not found"):
        envoy_launcher.find_envoy()


def test_sim_port_in_use_is_a_clear_message() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "epp.cli", "sim", "--replicas", "1", "--base-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert run.returncode != 0
    assert "Address already in use" in run.stderr or "in use" in run.stderr
    assert "Traceback" not in run.stderr


def test_picker_port_in_use_is_a_clear_message() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "epp.cli", "serve", "--plaintext", "--extproc-port", str(port),
             "--health-port", "0", "--metrics-port", "0", "--endpoints", "127.0.0.1:1"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "cannot open a port" in run.stderr and "Traceback" not in run.stderr
