"""Child processes for the demo, the tests and the benchmarks: start one, await its readiness, stop it and
everything it spawned.

    async with Child("sim", sim_argv(4, time_scale=0.25), ready_file=True) as sim:
        sim.info["addresses"]        # the JSON the child wrote to its ready file
    async with Child("envoy", [envoy, "-c", path], ready_url=f"http://127.0.0.1:{admin}/ready") as envoy:
        ...
    child = Child(...); await child.start(); ...; await child.stop()

Readiness, one of:
- a ready file (`ready_file=True`): `--ready-file PATH` is appended to the argv and the child writes JSON to
  PATH once it serves (`epp serve`, `epp sim`, the overhead benchmark's no-op ext_proc); `info` holds it. A
  half-written file is read again on the next poll.
- an HTTP probe (`ready_url=URL`): GET URL until it answers 200 (Envoy's admin `/ready`, a router's
  `/health`).
- neither: running is ready.
Waiting polls every `POLL_S` while awaiting the child's exit, so an early exit is noticed at once: the child
is stopped and `ProcessError` says why, with the tail of its log (stdout and stderr go to one log file).

The child runs in a session of its own (`start_new_session=True`): Ctrl-C in a terminal reaches only this
process, which stops its children on the way out, and `stop()` signals the child's whole process group
(SIGTERM, then SIGKILL after `stop_timeout`), so nothing it spawned outlives it. `kill()` is a crash instead:
SIGKILL at once, no graceful shutdown (the kernel resets its open connections). After `stop()` or `kill()`,
`start()` runs the same argv again: with fixed ports (`sim(1, base_port=P)`, `picker(..., extproc_port=P)`)
that is a restart at the same address, as the fault tests and the soak benchmark use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

POLL_S = 0.05
"""How often readiness is checked while waiting (the helper's own poll; callers never sleep)."""
PROBE_TIMEOUT_S = 1.0


class ProcessError(RuntimeError):
    """A child process did not start or become ready; the message carries the tail of its log."""


class Child:
    """One child process. See the module docstring; `start()` returns `info` (the ready file's JSON)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready_file: bool = False,
        ready_url: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        log: str | Path | None = None,
        timeout: float = 60.0,
        stop_timeout: float = 15.0,
    ) -> None:
        if ready_file and ready_url:
            raise ValueError("a child is ready by its ready file or by an HTTP probe, not both")
        self.name = name
        self.argv = list(argv)
        self.ready_file = ready_file
        self.ready_url = ready_url
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.timeout = timeout
        self.stop_timeout = stop_timeout
        self.info: dict[str, Any] = {}
        self._log = Path(log) if log is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._process: asyncio.subprocess.Process | None = None

    # ---- state ---------------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def log_path(self) -> Path | None:
        return self._log

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` lines of the child's output."""
        if self._log is None or not self._log.exists():
            return "(no log)"
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:]) or "(empty log)"

    # ---- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        """Start the child and await its readiness; `ProcessError` (child stopped) if it never gets there."""
        if self._process is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._tmp = tempfile.TemporaryDirectory(prefix=f"epp-{self.name}-")
        workdir = Path(self._tmp.name)
        if self._log is None:
            self._log = workdir / f"{self.name}.log"
        argv = list(self.argv)
        ready_path = workdir / "ready.json"
        if self.ready_file:
            argv += ["--ready-file", str(ready_path)]
        try:
            with self._log.open("wb") as out:
                self._process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                    env=self.env, cwd=self.cwd, start_new_session=True,
                )  # fmt: skip
        except OSError as err:
            self._cleanup()
            raise ProcessError(f"{self.name} could not be started ({argv[0]}): {err}") from None
        try:
            self.info = await self._await_ready(ready_path)
        except BaseException:
            await self.stop()  # the error already carries the log's tail
            raise
        return self.info

    async def _await_ready(self, ready_path: Path) -> dict[str, Any]:
        process = self._process
        assert process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            if process.returncode is not None:
                raise ProcessError(
                    f"{self.name} exited with code {process.returncode} before it was ready; "
                    f"its log ends:\n{self.log_tail()}"
                )
            if self.ready_file:
                info = _read_json(ready_path)
                if info is not None:
                    return info
            elif self.ready_url:
                if await http_status(self.ready_url) == 200:
                    return {}
            else:
                return {}
            remaining = deadline - loop.time()
            if remaining <= 0:
                what = f"no answer 200 from {self.ready_url}" if self.ready_url else "no ready file"
                raise ProcessError(
                    f"{self.name} was not ready within {self.timeout:g} s ({what}); "
                    f"its log ends:\n{self.log_tail()}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), min(POLL_S, remaining))  # returns at once on exit

    async def stop(self) -> None:
        """SIGTERM the child's process group, SIGKILL it after `stop_timeout`; remove the temporary files (the
        log too, unless the caller chose its path). Safe to call twice, or on a child that never started."""
        process = self._process
        if process is not None:
            try:
                if process.returncode is None:
                    _signal_group(process.pid, signal.SIGTERM)
                    try:
                        await asyncio.wait_for(process.wait(), self.stop_timeout)
                    except TimeoutError:
                        _signal_group(process.pid, signal.SIGKILL)
                        await process.wait()
            finally:
                # Whatever the child spawned and left behind (the group outlives its leader), or everything
                # if this stop was itself cancelled.
                _signal_group(process.pid, signal.SIGKILL)
        self._process = None
        self._cleanup()

    async def kill(self) -> None:
        """A crash: SIGKILL the child's process group now (no SIGTERM, no graceful shutdown), await its exit,
        then clean up as `stop()` does. Safe on a child that already exited or never started."""
        process = self._process
        if process is not None and process.returncode is None:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
        await self.stop()

    def _cleanup(self) -> None:
        if self._tmp is not None:
            if self._log is not None and self._log.is_relative_to(self._tmp.name):
                self._log = None
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> Child:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _read_json(path: Path) -> dict[str, Any] | None:
    """The ready file's JSON object, or None while it is missing, empty or half-written."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if not text.strip():
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


async def http_status(url: str, timeout: float = PROBE_TIMEOUT_S) -> int | None:
    """The status code of `GET url` (HTTP/1.1, plain TCP), or None if nothing answers within `timeout`."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request)
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    fields = line.split()
    if len(fields) >= 2 and fields[0].startswith(b"HTTP/") and fields[1].isdigit():
        return int(fields[1])
    return None


# ---- the project's own children ------------------------------------------------------------------------


def sim_argv(replicas: int, base_port: int = 0, **options: Any) -> list[str]:
    """`python -m epp_lab.sim.cli` for `replicas` replicas on ephemeral ports, or on consecutive ports from
    `base_port` (a fixed address, so that a replica can be restarted where it was); `options` are its flags
    (`num_gpu_blocks=1200` -> `--num-gpu-blocks 1200`; None values are left out)."""
    argv = [sys.executable, "-m", "epp_lab.sim.cli", "--replicas", str(replicas)]
    argv += ["--base-port", str(base_port)]
    for key, value in options.items():
        if value is None:
            continue
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def picker_argv(
    endpoints: Sequence[str],
    config: str | Path | None = None,
    extra: Sequence[str] = (),
    extproc_port: int = 0,
) -> list[str]:
    """`python -m epp.cli serve` over `endpoints`, plaintext, warnings only; every port ephemeral except
    ext_proc's when `extproc_port` is given (Envoy's picker cluster names one port: a restarted picker must
    come back there)."""
    argv = [sys.executable, "-m", "epp.cli", "serve", "--plaintext", "--extproc-port", str(extproc_port),
            "--health-port", "0", "--metrics-port", "0", "--endpoints", ",".join(endpoints),
            "--log-level", "WARNING"]  # fmt: skip
    if config:
        argv += ["--config", str(config)]
    return argv + list(extra)


def sim(replicas: int, base_port: int = 0, **options: Any) -> Child:
    """A simulated fleet as a child; `info["addresses"]` once started. One replica on a fixed port
    (`sim(1, base_port=port)`) can be killed and started again at the same address."""
    return Child("sim", sim_argv(replicas, base_port, **options), ready_file=True)


def picker(
    endpoints: Sequence[str],
    config: str | Path | None = None,
    extra: Sequence[str] = (),
    extproc_port: int = 0,
) -> Child:
    """The picker as a child; `info["extproc"]`, `info["health"]`, `info["metrics"]`, `info["admin"]` (ports)
    once started."""
    return Child("picker", picker_argv(endpoints, config, extra, extproc_port), ready_file=True)
