"""The peer routers, installed on first use into a venv of their own (never the project's dependencies).

    vllm-router   PyPI `vllm-router`   (Rust router derived from SGLang's; `--policy cache_aware`)
    sglang-router PyPI `sglang-router` (SGLang Model Gateway, also installed as `smg`; `launch --policy
                  cache_aware`)

Both are run unmodified, with their default cache-aware parameters, bound to 127.0.0.1 (their metrics
port too). `ensure_venv()` creates `benchmarks/routing/.peers-venv` (git-ignored) with the pinned versions
below if it is missing or incomplete; a peer that cannot be installed or started is reported with the
reason and the benchmark goes on without it.
"""

from __future__ import annotations

import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".peers-venv"
PINS = {"vllm-router": "0.1.17", "sglang-router": "0.3.2"}
COMMANDS = {"vllm-router": "vllm-router", "sglang-router": "sglang-router"}


@dataclass(slots=True)
class PeerStatus:
    name: str
    version: str
    binary: str | None
    problem: str = ""  # why it cannot run here ("" = usable)


def _installed(name: str) -> str | None:
    python = VENV / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run(
        [str(python), "-m", "pip", "show", name], capture_output=True, text=True, check=False
    )
    for line in out.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def ensure_venv(log: Path | None = None) -> dict[str, PeerStatus]:
    """Install the pinned peers into `VENV` when needed; return each peer's status."""
    missing = [n for n, v in PINS.items() if _installed(n) != v]
    problem = ""
    if missing:
        print(f"routing: installing {', '.join(missing)} into {VENV} (first run only)", file=sys.stderr)
        try:
            if not (VENV / "bin" / "python").exists():
                venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
            out = subprocess.run(
                [
                    str(VENV / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    *(f"{n}=={PINS[n]}" for n in missing),
                ],
                capture_output=True,
                text=True,
                check=False,
                timeout=900,
            )
            if log is not None:
                log.write_text(out.stdout + out.stderr)
            if out.returncode != 0:
                problem = "pip install failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]
        except (OSError, subprocess.SubprocessError) as err:
            problem = f"cannot create the peers venv: {err}"
    statuses = {}
    for name, pin in PINS.items():
        binary = VENV / "bin" / COMMANDS[name]
        version = _installed(name)
        why = ""
        if version != pin or not binary.exists():
            why = problem or f"{name}=={pin} is not installed in {VENV}"
        statuses[name] = PeerStatus(name, version or "", str(binary) if not why else None, why)
    return statuses


def command(name: str, binary: str, workers: list[str], port: int, metrics_port: int) -> list[str]:
    """The peer's command line: cache-aware policy, every other parameter at its default."""
    urls = [f"http://{w}" for w in workers]
    common = [
        "--policy",
        "cache_aware",
        "--worker-urls",
        *urls,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(metrics_port),
    ]
    if name == "vllm-router":
        return [binary, *common, "--log-level", "warning"]
    if name == "sglang-router":
        return [binary, "launch", *common, "--log-level", "warn"]
    raise ValueError(f"unknown peer {name!r}")
