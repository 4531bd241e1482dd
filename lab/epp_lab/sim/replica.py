"""The asyncio driver of one simulated replica: runs its `Engine` in (scaled) real time.

One task per replica loops: schedule a step, sleep its simulated duration x `time_scale`, apply it, wake the
HTTP handlers whose requests progressed. Simulated time is `(loop.time() - start) / time_scale`.

The loop yields to the event loop before every step is applied, even when the step is already overdue
(`asyncio.sleep(0)`), so the handlers woken by one step always run before the next step is applied: a
handler that keeps up sends one SSE event per wake-up, whatever the machine's load.

Token grouping: a handler is woken for a request's first token, its last token, and otherwise once every
`stream_interval` tokens (vLLM's `--stream-interval`); it then sends every token it has not sent yet as one
SSE event. Under load a handler that falls behind also merges tokens of several steps into one event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import xxhash

from epp_lab.sim.config import FleetConfig
from epp_lab.sim.engine import FINISHED, Engine, SimRequest, block_hashes, prompt_token_count
from epp_lab.sim.kvevents import KVEventPublisher, start_replay

log = logging.getLogger(__name__)

# A small fixed vocabulary: output text only has to be deterministic and cheap, not meaningful.
_WORDS_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if so no will more can out up "
    "into do any your what time could other than then now only some may very over such our these two"
)
_STREAM_LEN = 4096
# Late by less than this (real seconds, e.g. timer overshoot), the next step starts where the previous one
# ended, so that the simulated throughput does not depend on the event loop's timer resolution.
_MAX_CATCH_UP_S = 0.003


def output_vocabulary(seed: int) -> list[str]:
    """A fixed pseudo-random stream of word tokens (" word") drawn with `seed`; outputs are slices of it."""
    rng = random.Random(seed)
    words = _WORDS_TEXT.split()
    return [" " + rng.choice(words) for _ in range(_STREAM_LEN)]


class Replica:
    """One vLLM-like replica: an engine, its driver task and what the HTTP layer needs to build requests."""

    def __init__(self, config: FleetConfig, index: int = 0) -> None:
        """Replica number `index` of the fleet `config` describes."""
        self.config = config
        self.model = config.model
        self.adapters = config.lora_adapters
        self.served = frozenset((config.model, *config.lora_adapters))
        self.engine = Engine(config.engine_config(index))
        self.time_scale = config.time_scale
        self.seed = config.seed
        self.stream_interval = max(1, config.stream_interval)
        self.vocab = output_vocabulary(config.seed)
        self._next_id = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self.publisher: KVEventPublisher | None = None  # set by the fleet when KV events are on
        self._replay: asyncio.Task[None] | None = None

    # ---- requests ------------------------------------------------------------------------------------

    def make_request(self, text: str, model: str, max_tokens: int) -> SimRequest:
        """A request for `model` (the base model or one of the adapters) with `text` as its prompt."""
        self._next_id += 1
        lora = None if model == self.model else model
        return SimRequest(
            request_id=str(self._next_id),
            model=model,
            lora=lora,
            prompt_tokens=prompt_token_count(text),
            max_tokens=max_tokens,
            block_hashes=block_hashes(text, model),
            text=text,
        )

    def output_offset(self, text: str) -> int:
        """Where in the vocabulary stream this prompt's output starts: a function of the prompt and seed."""
        return xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass"), self.seed) % _STREAM_LEN

    def output_text(self, offset: int, start: int, end: int) -> str:
        v = self.vocab
        return "".join(v[(offset + i) % _STREAM_LEN] for i in range(start, end))

    def now(self) -> float:
        """Simulated seconds since the replica started."""
        return (asyncio.get_running_loop().time() - self._t0) / self.time_scale

    def submit(self, req: SimRequest) -> None:
        self.engine.submit(req, self.now())
        self._wake.set()

    # ---- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._t0 = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._run(), name="sim-replica-driver")
        if self.publisher is not None:
            self._replay = start_replay(self.publisher)

    async def stop(self) -> None:
        for task in (self._task, self._replay):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._replay = None

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("simulated replica driver crashed")
            raise

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        eng = self.engine
        ts = self.time_scale
        interval = self.stream_interval
        max_lag = _MAX_CATCH_UP_S / ts
        sim_end = 0.0
        while True:
            if not eng.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = eng.schedule()
            if not batch.scheduled:
                # Nothing fits now (cannot happen with validated requests); wait for news, never spin.
                self._wake.clear()
                await self._wake.wait()
                continue
            now = (loop.time() - self._t0) / ts
            start = sim_end if now - sim_end < max_lag else now
            sim_end = start + batch.duration
            delay = self._t0 + sim_end * ts - loop.time()
            # Always yield, even when the step is overdue (delay <= 0): the handlers woken by the previous
            # step run before this one is applied, so their SSE events never merge because of this loop.
            # The simulated clock is unaffected: `sim_end` above already carries the catch-up.
            await asyncio.sleep(delay if delay > 0 else 0)
            progressed = eng.finish(batch, sim_end)
            if eng.kv_events:
                if self.publisher is not None:
                    self.publisher.publish(eng.kv_events)
                eng.kv_events.clear()
            for req in progressed:
                if req.notified == 0 or req.state == FINISHED or req.generated - req.notified >= interval:
                    req.notified = req.generated
                    if req.listener is not None:
                        req.listener()
