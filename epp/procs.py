"""Start the simulated fleet and the picker as child processes and await their readiness (ready files),
for the demo and the benchmarks. Every child is stopped on exit, error or Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any


class ProcessError(RuntimeError):
    """A child process failed to start; the message carries the tail of its output."""


@asynccontextmanager
async def child(name: str, args: list[str], timeout: float = 60.0) -> AsyncIterator[dict[str, Any]]:
    """Run `python -m epp.cli ARGS --ready-file F`; yield F's JSON once written; stop the child after."""
    with tempfile.TemporaryDirectory(prefix=f"epp-{name}-") as tmp:
        ready = Path(tmp) / "ready.json"
        log = Path(tmp) / "output.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "epp.cli", *args, "--ready-file", str(ready),
                stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        try:
            info = await _await_ready(process, ready, timeout)
            if info is None:
                tail = log.read_text(errors="replace")[-2000:]
                raise ProcessError(f"{name} did not start (exit code {process.returncode}):\n{tail}")
            info["pid"] = process.pid
            yield info
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def _await_ready(process: asyncio.subprocess.Process, ready: Path, timeout: float) -> dict | None:
    """The child writes the ready file once listening; poll it while watching for an early exit."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if ready.exists() and ready.stat().st_size:
            try:
                return json.loads(ready.read_text())
            except ValueError:
                pass  # partially written
        try:
            await asyncio.wait_for(process.wait(), 0.05)
            return None  # exited before becoming ready
        except TimeoutError:
            continue
    return None


def sim_args(replicas: int, **options: Any) -> list[str]:
    args = ["sim", "--replicas", str(replicas), "--base-port", "0"]
    for key, value in options.items():
        if value is None:
            continue
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def picker_args(endpoints: list[str], config: str | None = None, extra: list[str] | None = None) -> list[str]:
    args = ["serve", "--plaintext", "--extproc-port", "0", "--health-port", "0", "--metrics-port", "0",
            "--endpoints", ",".join(endpoints), "--log-level", "WARNING"]  # fmt: skip
    if config:
        args += ["--config", config]
    return args + (extra or [])
