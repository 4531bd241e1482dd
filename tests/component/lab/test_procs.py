"""The child-process helper with real processes: readiness by ready file or HTTP probe, early exits and
timeouts reported with the log's tail, and stops that take the whole process group."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from pathlib import Path

import pytest

from epp_lab.envoy_launcher import free_port
from epp_lab.procs import Child, ProcessError, http_status

HANG_GUARD_S = 60.0


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


# A child that writes its ready file in two steps (a reader may see it half-written), then waits.
READY_IN_TWO_WRITES = """
    import json, sys, time
    path = sys.argv[sys.argv.index("--ready-file") + 1]
    text = json.dumps({"port": 1234, "name": "x" * 1000})
    with open(path, "w") as f:
        f.write(text[:500]); f.flush(); time.sleep(0.2); f.write(text[500:])
    print("serving", flush=True)
    time.sleep(600)
"""


def gone_or_zombie(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


async def wait_gone(pid: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HANG_GUARD_S
    while not gone_or_zombie(pid):
        if loop.time() > deadline:
            pytest.fail(f"hang guard: process {pid} still alive after {HANG_GUARD_S:g} s")
        await asyncio.sleep(0.01)  # the poll's period


async def test_ready_file_info_and_stop() -> None:
    child = Child("writer", python(READY_IN_TWO_WRITES), ready_file=True)
    async with child:
        assert child.info == {"port": 1234, "name": "x" * 1000}  # never the half-written file
        assert child.running and child.pid is not None
        pid = child.pid
    assert not child.running and child.pid is None
    await wait_gone(pid)
    await child.stop()  # twice is fine


async def test_http_probe_readiness(tmp_path: Path) -> None:
    port = free_port()
    server = Child(
        "http",
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        ready_url=f"http://127.0.0.1:{port}/",
        cwd=tmp_path,
    )
    info = await server.start()
    try:
        assert info == {}
        assert await http_status(f"http://127.0.0.1:{port}/") == 200
    finally:
        await server.stop()
    assert await http_status(f"http://127.0.0.1:{port}/") is None  # nothing listens any more


async def test_early_exit_fails_fast_with_the_log_tail() -> None:
    code = "import sys; print('cannot open a port: 8100 in use', flush=True); sys.exit(3)"
    with pytest.raises(ProcessError, match="exited with code 3") as err:
        await Child("doomed", python(code), ready_file=True, timeout=HANG_GUARD_S).start()
    assert "cannot open a port: 8100 in use" in str(err.value)


async def test_never_ready_is_stopped_and_reported() -> None:
    # The bound is the helper's readiness timeout under test; the child never gets ready however long.
    child = Child("silent", python("import time; time.sleep(600)"), ready_file=True, timeout=0.2)
    with pytest.raises(ProcessError, match=r"not ready within 0\.2 s \(no ready file\)"):
        await child.start()
    assert not child.running


async def test_stop_takes_the_process_group_and_kills_what_ignores_sigterm() -> None:
    # The child ignores SIGTERM and starts a grandchild that does too; stop() must still end both.
    code = """
        import json, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        path = sys.argv[sys.argv.index("--ready-file") + 1]
        with open(path + ".tmp", "w") as f:
            json.dump({"grandchild": grandchild.pid}, f)
        import os; os.replace(path + ".tmp", path)
        time.sleep(600)
    """
    child = Child("stubborn", python(code), ready_file=True, stop_timeout=0.2)
    info = await child.start()
    pid, grandchild = child.pid, info["grandchild"]
    assert pid is not None and os.getpgid(grandchild) == os.getpgid(pid) == pid  # a session of its own
    await child.stop()
    await wait_gone(pid)
    await wait_gone(grandchild)


async def test_terminal_interrupt_does_not_reach_the_child() -> None:
    # The child runs in its own session: a Ctrl-C sent to this test's process group does not kill it.
    child = Child("sleeper", python("import time; time.sleep(600)"))
    await child.start()
    try:
        assert child.pid is not None and os.getsid(child.pid) == child.pid != os.getsid(0)
    finally:
        await child.stop()
