"""The simulation core: one replica's scheduler, KV cache and LoRA slots, on a virtual clock.

Nothing here knows about asyncio or HTTP; a driver (`epp_lab.sim.replica`) calls, in a loop,

    batch = engine.schedule()          # one scheduling iteration, like one vLLM engine step
    ... wait batch.duration simulated seconds ...
    progressed = engine.finish(batch, now + batch.duration)

and tests do the same with a plain float clock (`run_until_idle`).

Model (vLLM v1-like, simplified):
- Continuous batching: running requests are served first (one token each when decoding, the next chunk of
  their prompt when prefilling), then waiting requests are admitted FCFS while `max_num_seqs` and the
  per-step token budget `max_num_batched_tokens` allow (chunked prefill). A waiting request that does not
  fit in the KV cache blocks the queue (head of line, as vLLM); one whose LoRA adapter cannot get a slot is
  skipped so later requests may go first (as vLLM).
- KV cache: `num_gpu_blocks` blocks of 16 tokens. Prompt tokens = ceil(chars / 4). The prompt TEXT is cut into
  64-character blocks whose ids are chained hashes: h_i = xxh64(h_{i-1} as 8 bytes + chars of block i,
  seed = xxh64(model)), so a block id names its whole prefix and adapters never share blocks. On admission a
  request pins the longest run of leading blocks already cached (its cached tokens; at least one prompt
  token is always computed) and allocates the rest of its prompt's blocks; full prompt blocks become cached
  as their chunk is computed; decoding allocates a block every 16 tokens. Blocks of finished requests stay
  cached, unpinned, and are evicted least recently used first (a prompt's tail before its head). A request
  waits if its prompt does not fit; if a running request cannot grow, the most recently admitted running
  request is preempted (its blocks freed, it is requeued at the front and recomputed later), as vLLM does.
- KV events (`EngineConfig.kv_events`, off by default): like vLLM, `kv_events` collects `BlockStored` (a
  request's newly cached prompt blocks with their token ids, the simulator's scheme: token k = xxh32 of
  characters [4k, 4k+4), see `epp.scheduling.plugins.precise_prefix.tokenize.sim_token_ids`), `BlockRemoved`
  (evictions) and `AllBlocksCleared` (`reset_prefix_cache`) as vLLM's msgpack maps; the driver publishes
  them once per step (`epp_lab.sim.kvevents`).
- Output: exactly `max_tokens` tokens per request (like `ignore_eos`), so runs are deterministic. There is no
  randomness at all.
- LoRA: `max_lora` resident adapters. Admitting a request for a non-resident adapter loads it into a free
  slot, or in place of the least recently used adapter with no running request, and the step pays
  `lora_load_s`. With no slot to free, the request waits (skipped, not blocking others).
- Step duration (simulated seconds), see `epp_lab.sim.profiles`:
  decode_base + per_seq x scheduled requests + per_ctx_token x Σ context tokens
  + (prefill_overhead if any prompt tokens) + prefill_per_token x prompt tokens computed + lora_load x loads.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash

from epp.config import CHARS_PER_TOKEN
from epp.scheduling.plugins.precise_prefix.tokenize import sim_token_ids
from epp_lab.sim.config import EngineConfig
from epp_lab.sim.profiles import BLOCK_SIZE

BLOCK_CHARS = BLOCK_SIZE * CHARS_PER_TOKEN

# vLLM's buckets for vllm:time_to_first_token_seconds.
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip

WAITING, RUNNING, FINISHED, ABORTED = 0, 1, 2, 3


def prompt_token_count(text: str) -> int:
    """Tokens of a prompt: ceil(chars / 4), at least 1."""
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def block_hashes(text: str, model: str) -> list[int]:
    """Chained xxh64 ids of the prompt's full 64-character blocks, seeded with the model (or adapter) name."""
    seed = xxhash.xxh64_intdigest(model.encode())
    out: list[int] = []
    prev = 0
    data = text.encode("utf-8", "surrogatepass")
    # Cut the characters, not the bytes, so that the block boundaries match the token estimate.
    if len(data) == len(text):
        for i in range(0, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
            prev = xxhash.xxh64_intdigest(prev.to_bytes(8, "little") + data[i : i + BLOCK_CHARS], seed)
            out.append(prev)
    else:
        for i in range(0, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
            chunk = text[i : i + BLOCK_CHARS].encode("utf-8", "surrogatepass")
            prev = xxhash.xxh64_intdigest(prev.to_bytes(8, "little") + chunk, seed)
            out.append(prev)
    return out


def _blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


@dataclass(slots=True, eq=False)
class SimRequest:
    """One sequence in the engine. `arrival` and the times set later are simulated seconds."""

    request_id: str
    model: str
    lora: str | None
    prompt_tokens: int
    max_tokens: int
    block_hashes: list[int]
    arrival: float = 0.0
    state: int = WAITING
    generated: int = 0
    num_computed: int = 0
    """Tokens (prompt, then generated) whose KV has been computed."""
    cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at first admission (reported in usage)."""
    first_token_time: float | None = None
    finish_time: float | None = None
    admitted: bool = False
    hashed: list[int] = field(default_factory=list)
    """Cached blocks this request pins: always `block_hashes[:len(hashed)]`."""
    anon: int = 0
    """Blocks held that are not (yet) content-addressed: uncomputed prompt, partial and decode blocks."""
    notified: int = 0
    """Tokens already announced to `listener` (the driver's business; the engine never reads either)."""
    listener: Callable[[], object] | None = None
    text: str = ""
    """The prompt text (for the token ids of KV events)."""

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.generated

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival


@dataclass(slots=True)
class Batch:
    """One scheduling iteration: `(request, tokens computed for it)` pairs and the step's simulated cost."""

    scheduled: list[tuple[SimRequest, int]]
    duration: float
    prefill_tokens: int = 0
    lora_loads: int = 0


@dataclass(slots=True)
class EngineStats:
    """Counters since start. Prefix-cache queries and hits are in tokens, as vLLM counts them."""

    requests_received: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefix_queries: int = 0
    generated_tokens: int = 0
    completed: int = 0
    aborted: int = 0
    lora_loads: int = 0
    preemptions: int = 0
    evicted_blocks: int = 0
    steps: int = 0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_sum: float = 0.0
    ttft_count: int = 0


class Engine:
    """One replica's scheduler over a virtual clock. See the module docstring for the model."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        profile = config.profile
        self.config = config
        self.profile = profile
        self.num_gpu_blocks = config.num_gpu_blocks or profile.num_gpu_blocks
        self.max_num_seqs = config.max_num_seqs or profile.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens or profile.max_num_batched_tokens
        self.max_lora = config.max_lora
        self.waiting: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        # KV cache: ref counts of content-addressed blocks; unpinned ones also sit in `evictable` (LRU first).
        self.refs: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.empty = self.num_gpu_blocks
        # LoRA: resident adapters (LRU first) and how many running requests use each.
        self.loras: OrderedDict[str, None] = OrderedDict()
        self.lora_running: dict[str, int] = {}
        self.stats = EngineStats()
        # KV events of the current step (vLLM's msgpack maps), when enabled; the driver takes them.
        self.kv_events: list[dict[str, object]] | None = [] if config.kv_events else None

    # ---- queries -------------------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        """Longest sequence (prompt + output tokens) that fits in the whole KV cache."""
        return self.num_gpu_blocks * BLOCK_SIZE

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def kv_usage(self) -> float:
        """Fraction of blocks pinned by requests (cached-but-free blocks count as free, as in vLLM)."""
        return 1.0 - (self.empty + len(self.evictable)) / self.num_gpu_blocks

    def cached_prefix_blocks(self, hashes: list[int]) -> int:
        """Leading blocks of `hashes` present in the cache (pinned or not)."""
        n = 0
        refs = self.refs
        for h in hashes:
            if h not in refs:
                break
            n += 1
        return n

    def running_loras(self) -> list[str]:
        return sorted(a for a, n in self.lora_running.items() if n > 0)

    def waiting_loras(self) -> list[str]:
        return sorted({r.lora for r in self.waiting if r.lora is not None})

    # ---- requests ------------------------------------------------------------------------------------

    def submit(self, req: SimRequest, now: float) -> None:
        """Queue a request arriving at simulated time `now`. The caller checked it fits `max_model_len`."""
        req.arrival = now
        req.state = WAITING
        self.waiting.append(req)
        self.stats.requests_received += 1

    def abort(self, req: SimRequest) -> None:
        """Drop a request (client went away); frees its blocks and its LoRA slot use."""
        if req.state == WAITING:
            try:
                self.waiting.remove(req)
            except ValueError:
                return
        elif req.state == RUNNING:
            self.running.remove(req)
            self._release(req)
        else:
            return
        req.state = ABORTED
        self.stats.aborted += 1

    # ---- one step ------------------------------------------------------------------------------------

    def schedule(self) -> Batch:
        """Pick the work of one step and reserve its KV blocks; the step's tokens land in `finish`."""
        p = self.profile
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[SimRequest, int]] = []
        prefill_tokens = 0
        ctx_tokens = 0
        preempted = False

        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            need = _blocks_for(req.num_computed + n) - len(req.hashed) - req.anon
            while need > self.empty + len(self.evictable):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if req.state != RUNNING:
                break
            if need > 0:
                self._allocate(need)
                req.anon += need
            scheduled.append((req, n))
            budget -= n
            ctx_tokens += req.num_computed + n
            if n > 1 or req.num_computed < req.prompt_tokens:
                prefill_tokens += n  # a prompt chunk, or recomputation after preemption
            i += 1

        loads = 0
        # As vLLM: no admissions in a step that had to preempt, since memory is short.
        if not preempted:
            skipped: list[SimRequest] = []
            waiting = self.waiting
            while waiting and budget > 0 and len(running) < self.max_num_seqs:
                req = waiting[0]
                lora = req.lora
                if lora is not None and lora not in self.loras and not self._lora_slot_available():
                    skipped.append(waiting.popleft())
                    continue
                hits = self.cached_prefix_blocks(req.block_hashes)
                if hits * BLOCK_SIZE >= req.num_tokens:
                    hits -= 1  # the last prompt token is always computed, to produce the first output token
                need = _blocks_for(req.num_tokens) - hits
                pinned_free = sum(1 for h in req.block_hashes[:hits] if h in self.evictable)
                if need > self.empty + len(self.evictable) - pinned_free:
                    break  # KV full: the queue waits (head of line)
                waiting.popleft()
                if lora is not None:
                    if lora not in self.loras:
                        self._load_lora(lora)
                        loads += 1
                    else:
                        self.loras.move_to_end(lora)
                    self.lora_running[lora] = self.lora_running.get(lora, 0) + 1
                for h in req.block_hashes[:hits]:
                    if self.refs[h] == 0:
                        del self.evictable[h]
                    self.refs[h] += 1
                req.hashed = req.block_hashes[:hits]
                self._allocate(need)
                req.anon = need
                req.num_computed = hits * BLOCK_SIZE
                if not req.admitted:
                    req.admitted = True
                    req.cached_tokens = req.num_computed
                    st = self.stats
                    st.prompt_tokens += req.prompt_tokens
                    st.cached_tokens += req.num_computed
                    st.prefix_queries += req.prompt_tokens
                req.state = RUNNING
                running.append(req)
                n = min(req.num_tokens - req.num_computed, budget)
                scheduled.append((req, n))
                budget -= n
                ctx_tokens += req.num_computed + n
                prefill_tokens += n
            if skipped:
                waiting.extendleft(reversed(skipped))

        duration = 0.0
        if scheduled:
            duration = (
                p.decode_base_s
                + p.decode_per_seq_s * len(scheduled)
                + p.decode_per_ctx_token_s * ctx_tokens
                + p.prefill_per_token_s * prefill_tokens
                + p.lora_load_s * loads
            )
            if prefill_tokens:
                duration += p.prefill_overhead_s
        return Batch(scheduled, duration, prefill_tokens, loads)

    def finish(self, batch: Batch, now: float) -> list[SimRequest]:
        """Apply a step that ended at simulated time `now`; returns the requests that got a token or ended."""
        st = self.stats
        st.steps += 1
        progressed: list[SimRequest] = []
        done = False
        refs = self.refs
        for req, n in batch.scheduled:
            if req.state != RUNNING:
                continue  # aborted during the step
            req.num_computed += n
            # Full prompt blocks just computed become content-addressed (shareable) blocks.
            full = min(req.num_computed // BLOCK_SIZE, len(req.block_hashes))
            k = len(req.hashed)
            if full > k:
                new_blocks: list[int] = []
                for i, h in enumerate(req.block_hashes[k:full], k):
                    r = refs.get(h)
                    if r is None:
                        refs[h] = 1
                        if self.kv_events is not None:
                            new_blocks.append(i)
                    else:
                        # Computed concurrently by another request: share that block, return ours.
                        if r == 0:
                            del self.evictable[h]
                        refs[h] = r + 1
                        self.empty += 1
                    req.anon -= 1
                req.hashed = req.block_hashes[:full]
                if new_blocks:
                    self._stored(req, new_blocks)
            if req.num_computed < req.num_tokens:
                continue  # prompt chunk; no token yet
            req.generated += 1
            st.generated_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
                ttft = now - req.arrival
                st.ttft_sum += ttft
                st.ttft_count += 1
                b = bisect_left(TTFT_BUCKETS, ttft)
                if b < len(TTFT_BUCKETS):
                    st.ttft_buckets[b] += 1
            if req.generated >= req.max_tokens:
                req.state = FINISHED
                req.finish_time = now
                self._release(req)
                st.completed += 1
                done = True
            progressed.append(req)
        if done:
            self.running = [r for r in self.running if r.state == RUNNING]
        return progressed

    def step(self, now: float) -> tuple[float, list[SimRequest]]:
        """`schedule` + `finish` at once; returns (step end time, progressed requests)."""
        batch = self.schedule()
        end = now + batch.duration
        return end, self.finish(batch, end)

    def run_until_idle(self, now: float = 0.0, max_steps: int = 1_000_000) -> float:
        """Step on a virtual clock until no work is left; returns the final time (for tests)."""
        for _ in range(max_steps):
            if not self.has_work():
                break
            batch = self.schedule()
            if not batch.scheduled:
                raise RuntimeError("engine stalled: work queued but nothing schedulable")
            now += batch.duration
            self.finish(batch, now)
        return now

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block no request holds (vLLM's `/reset_prefix_cache`); False, and nothing
        dropped, while requests hold blocks (as vLLM)."""
        if any(self.refs.values()):
            return False
        self.empty += len(self.evictable)
        self.evictable.clear()
        self.refs.clear()
        if self.kv_events is not None:
            self.kv_events.append({"type": "AllBlocksCleared"})
        return True

    # ---- internals -----------------------------------------------------------------------------------

    def _stored(self, req: SimRequest, blocks: list[int]) -> None:
        """KV events for the newly cached blocks `blocks` (indices into the prompt's blocks) of `req`: one
        BlockStored per run of consecutive blocks, as vLLM announces a request's new blocks per step."""
        assert self.kv_events is not None
        runs: list[list[int]] = []
        for i in blocks:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            first = run[0]
            start, end = first * BLOCK_CHARS, (run[-1] + 1) * BLOCK_CHARS
            self.kv_events.append(
                {
                    "type": "BlockStored",
                    "block_hashes": [req.block_hashes[i] for i in run],
                    "parent_block_hash": req.block_hashes[first - 1] if first else None,
                    "token_ids": sim_token_ids(req.text[start:end]),
                    "block_size": BLOCK_SIZE,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": req.lora,
                }
            )

    def _allocate(self, n: int) -> None:
        """Take `n` blocks: never-used first, then evict cached unpinned blocks, least recently used first."""
        take = min(n, self.empty)
        self.empty -= take
        n -= take
        while n > 0:
            h, _ = self.evictable.popitem(last=False)
            del self.refs[h]
            self.stats.evicted_blocks += 1
            if self.kv_events is not None:
                self.kv_events.append({"type": "BlockRemoved", "block_hashes": [h], "medium": "GPU"})
            n -= 1

    def _release(self, req: SimRequest) -> None:
        # Unpin the tail first so the LRU evicts a prompt's tail before its shared head (as vLLM does).
        refs = self.refs
        for h in reversed(req.hashed):
            r = refs[h] - 1
            refs[h] = r
            if r == 0:
                self.evictable[h] = None
        req.hashed = []
        self.empty += req.anon
        req.anon = 0
        if req.lora is not None:
            self.lora_running[req.lora] -= 1

    def _preempt(self, req: SimRequest) -> None:
        self._release(req)
        req.state = WAITING
        req.num_computed = 0
        self.waiting.appendleft(req)
        self.stats.preemptions += 1

    def _lora_slot_available(self) -> bool:
        if len(self.loras) < self.max_lora:
            return True
        return any(self.lora_running.get(a, 0) == 0 for a in self.loras)

    def _load_lora(self, lora: str) -> None:
        if len(self.loras) >= self.max_lora:
            victim = next(a for a in self.loras if self.lora_running.get(a, 0) == 0)
            del self.loras[victim]
        self.loras[lora] = None
        self.stats.lora_loads += 1
