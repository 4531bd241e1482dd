"""An asyncio event loop on a virtual clock, for timing behaviour tested without the wall clock.

`loop.time()` starts at 1000.0 (0 often means "never", e.g. an unscraped endpoint) and only moves when the
loop would otherwise wait: when nothing is ready, the selector is polled without blocking and the clock
jumps to the next timer. So `await asyncio.sleep(5)` takes
no real time, timers fire in exactly the order and at exactly the times the code scheduled, and a test that
asserts "the next scrape started 0.128 s after the previous one" asserts it exactly, however busy the CPU is.

Only for code without real I/O (fake transports): real sockets would need real time to deliver data.

    def test_something() -> None:
        run_virtual(main())        # main() is a coroutine; returns its result

A coroutine that waits for something nothing will ever do fails with `Deadlock` instead of hanging.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Deadlock(RuntimeError):
    """Nothing is scheduled and nothing can happen: the coroutine under test waits forever."""


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.loop: VirtualTimeLoop | None = None
        self._idle_polls = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)  # the loop's self-pipe (call_soon_threadsafe) is the only real fd
        if ready:
            self._idle_polls = 0
            return ready
        assert self.loop is not None
        if timeout is None:  # no timer at all and nothing ready
            self._idle_polls += 1
            if self._idle_polls > 1000:
                raise Deadlock("the event loop has nothing scheduled: the coroutine waits forever")
            return ready
        self._idle_polls = 0
        if timeout > 0:
            self.loop.advance(timeout)
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        selector = _VirtualSelector()
        super().__init__(selector)
        selector.loop = self
        self._now = 1000.0

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh virtual-time loop."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
