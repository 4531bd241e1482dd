"""Helpers shared by the benchmarks: the machine a result was taken on, result files, CPU time, git state.

Tables come from `epp_lab.tables` (the project's one markdown-table writer, re-exported here); child
processes from `epp_lab.procs`.

Every committed result says how it was made (command), where (nproc, memory, platform, versions) and when
(UTC), so a number can be traced and re-run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from epp_lab.tables import markdown_table, records_table

__all__ = [
    "CLOCK_TICKS",
    "REPO",
    "RESULTS_DIR",
    "VENV_BIN",
    "children_cpu_seconds",
    "command_line",
    "git",
    "load_average",
    "machine_busy_seconds",
    "machine_info",
    "machine_memory_bytes",
    "markdown_table",
    "process_cpu_seconds",
    "records_table",
    "tool_version",
    "write_json",
]

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
VENV_BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def tool_version(argv: Sequence[str]) -> str | None:
    """First line of `argv` (e.g. `envoy --version`), or None if the tool is missing."""
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].strip() if text else None


def command_line() -> str:
    """How this run was started, relative to the repository root where possible."""

    def rel(path: str) -> str:
        return os.path.relpath(path, REPO) if path.startswith(str(REPO)) else path

    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


def machine_info(benchmark: str, **extra: Any) -> dict[str, Any]:
    """The header of a result file: benchmark, command, UTC date, nproc, memory, load, platform, Python."""
    header: dict[str, Any] = {
        "benchmark": benchmark,
        "command": command_line(),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "machine_memory_bytes": machine_memory_bytes(),
        "load_average_at_start": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    header.update(extra)
    return header


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) from /proc/<pid>/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / CLOCK_TICKS


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds over all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time (already counted in user)
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def children_cpu_seconds() -> float:
    """CPU of reaped children: the delta around one k6 run is that k6's CPU (other children live on)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def git(*argv: str) -> str:
    """`git ARGV` in the repository (read-only queries); "" if git is missing or fails."""
    try:
        out = subprocess.run(
            ["git", *argv], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout
