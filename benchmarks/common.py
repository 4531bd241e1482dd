"""Helpers shared by the benchmarks: the machine a result was taken on, result files, tables, CPU time.

Every committed result says how it was made (command), where (nproc, memory, platform, versions) and when
(UTC), so a number can be traced and re-run.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table; None prints as an en dash."""
    if not rows:
        return "(no rows)\n"
    keys = list(columns or rows[0].keys())

    def cell(value: Any) -> str:
        return "–" if value is None else str(value)

    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


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
