"""Approximate prefix-cache index: which endpoint most likely holds a prompt's prefix in its KV cache.

The picker never sees the servers' real caches. Instead it remembers, per endpoint, the prompt blocks it sent
there, and assumes a server caches what it served until it would have run out of room (a bounded LRU sized
like the server's KV cache). Two pieces:

* `block_hashes` cuts the prompt text into 64-character blocks (16 tokens x 4 chars per token) and gives
  each full block a chained 64-bit hash, so one integer names a whole prefix (as vLLM's block hashes do).
* `PrefixIndex` maps those hashes to the endpoints that hold them and answers, for each candidate, how many
  leading blocks of the prompt it holds. The prefix scorer's value is `matched / len(hashes)`.

Everything is synchronous and single-threaded (it lives on the server's event loop). Memory is bounded:
total entries <= sum of per-endpoint capacities. One (endpoint, block) entry costs ~155-250 bytes on
CPython 3.11 (~205 at 1M entries; the spread is dict tables growing in powers of two), measured with
tracemalloc by `benchmarks/bench_prefix_index.py`: so the default 31,250 blocks cost ~6.5 MB per endpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from heapq import heappop, heappush
from itertools import islice
from typing import TypedDict

from xxhash import xxh64_intdigest

from epp.config import CHARS_PER_TOKEN

BLOCK_TOKENS = 16  # tokens per index block
DEFAULT_BLOCK_CHARS = BLOCK_TOKENS * CHARS_PER_TOKEN  # 64
DEFAULT_MAX_BLOCKS = 256  # 4096 tokens: deeper prefixes add little to the score and cost hashing time
# 31,250 blocks x 16 tokens = 500k tokens: the upstream default (HBM free for KV / KV bytes per token).
DEFAULT_CAPACITY_BLOCKS = 31_250
# A 64-bit hash as a Python int (36 bytes on CPython); each entry pins about one (see `stats`).
_INT_BYTES = sys.getsizeof(2**63)

_HASH_FORMAT = b"epp-prefix-v1"  # bump when what is hashed changes, so old and new hashes never mix


@lru_cache(maxsize=1024)
def _root_hash(seed_model: str, cache_salt: str, block_chars: int) -> int:
    """h_0: the parent of the first block. Length-prefixed fields so no two (model, salt) pairs collide."""
    model = seed_model.encode("utf-8", "surrogatepass")
    salt = cache_salt.encode("utf-8", "surrogatepass")
    return xxh64_intdigest(
        b"%s\x00%d\x00%d:%s%d:%s" % (_HASH_FORMAT, block_chars, len(model), model, len(salt), salt)
    )


def block_hashes(
    text: str,
    *,
    seed_model: str,
    cache_salt: str = "",
    block_chars: int = DEFAULT_BLOCK_CHARS,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
) -> list[int]:
    """Chained 64-bit hashes of the first `min(len(text) // block_chars, max_blocks)` full blocks of `text`.

    Block i is the UTF-8 encoding of `text[i*block_chars:(i+1)*block_chars]` (characters, not bytes). Then

        h_0     = xxh64(b"epp-prefix-v1\\0" + block_chars + len-prefixed seed_model and cache_salt)
        h_{i+1} = xxh64(block_i, seed=h_i)         returned: [h_1, ..., h_n]

    Using the parent hash as the seed chains the blocks: `hashes[k]` identifies the whole prefix
    `text[:(k+1)*block_chars]` together with model and salt, so one lookup per block tests a prefix, and the
    same block text after a different prefix (or for another model or tenant salt) never matches. A trailing
    partial block is not hashed because servers only cache (and reuse) full blocks. At most `max_blocks`
    are hashed, so a 32k-token prompt costs no more than a 4k-token one (defaults: 64 chars, 256 blocks).
    """
    if block_chars <= 0:
        raise ValueError(f"block_chars must be positive, got {block_chars}")
    count = min(len(text) // block_chars, max_blocks)
    if count <= 0:
        return []
    end = count * block_chars
    h = _root_hash(seed_model, cache_salt, block_chars)
    out: list[int] = []
    append = out.append
    if text.isascii():
        # One character == one byte: encode once and slice bytes (saves an encode per block).
        data = text[:end].encode("ascii")
        for start in range(0, end, block_chars):
            h = xxh64_intdigest(data[start : start + block_chars], h)
            append(h)
    else:
        for start in range(0, end, block_chars):
            h = xxh64_intdigest(text[start : start + block_chars].encode("utf-8", "surrogatepass"), h)
            append(h)
    return out


def capacity_blocks_for(num_gpu_blocks: int, block_size: int, block_tokens: int = BLOCK_TOKENS) -> int:
    """Index capacity (our 16-token blocks) for a server with `num_gpu_blocks` of `block_size` tokens each.

    capacity = num_gpu_blocks * block_size // block_tokens (the server's KV cache in tokens, in our blocks);
    e.g. vLLM's 2,000 blocks of 16 tokens -> 2,000; 1,000 blocks of 32 tokens -> 2,000.
    """
    if num_gpu_blocks <= 0 or block_size <= 0:
        raise ValueError(f"cache shape must be positive, got {num_gpu_blocks} blocks of {block_size} tokens")
    return num_gpu_blocks * block_size // block_tokens


class PrefixIndexStats(TypedDict):
    endpoints: int
    entries_per_endpoint: dict[str, int]
    total_entries: int
    distinct_blocks: int
    capacity_blocks: int
    memory_bytes_estimate: int
    lookups: int
    queried_blocks: int
    hit_blocks: int
    hit_ratio: float


@dataclass(slots=True, eq=False)
class _EndpointBlocks:
    """One endpoint's blocks, least recently used first. `bit` is its bit in the global owner masks."""

    eid: int
    bit: int
    capacity: int
    lru: dict[int, None] = field(default_factory=dict)


class PrefixIndex:
    """Per-endpoint bounded LRU of block hashes with a global index for fast matching.

    Layout: `_owners` maps block hash -> bitmask of the endpoint ids holding it (endpoint `eid` is bit
    `1 << eid`; freed ids are reused lowest first so masks stay small, and single-owner masks share one int
    object per endpoint, so the common case costs no allocation). `match` walks the prompt's blocks ANDing
    masks while any candidate still matches: cost ~ O(blocks matched + candidates), with no per-candidate
    work per block. Each endpoint's LRU is a plain insertion-ordered dict (refresh = delete and re-insert,
    evict = the first keys): ~65 bytes per entry less than an `OrderedDict`. Evicting all of a `record`'s
    excess with one iterator keeps that cheap: the deleted slots it skips are few and skipped in C, and the
    dict compacts them when it next resizes. Capacity defaults to 31,250 blocks (500k tokens).
    Invariant: an endpoint's bit is set in `_owners[h]` iff `h` is in its LRU, so total entries <= sum of
    capacities.
    """

    __slots__ = (
        "_bits",
        "_endpoints",
        "_free_ids",
        "_id_epoch",
        "_next_id",
        "_owners",
        "_resolved",
        "default_capacity_blocks",
        "hit_blocks",
        "lookups",
        "queried_blocks",
    )

    def __init__(self, default_capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        if default_capacity_blocks < 0:
            raise ValueError(f"default_capacity_blocks must be >= 0, got {default_capacity_blocks}")
        self.default_capacity_blocks = default_capacity_blocks
        self._endpoints: dict[str, _EndpointBlocks] = {}
        self._owners: dict[int, int] = {}
        self._free_ids: list[int] = []  # heap: reuse the lowest id to keep masks short
        self._next_id = 0
        self._bits: list[int] = []  # eid -> 1 << eid, the shared single-owner mask objects
        # Bumped whenever an address gains or loses its id; guards `_resolve`'s one-entry cache.
        self._id_epoch = 0
        self._resolved: tuple[int, tuple[str, ...], list[int], int] | None = None
        # Counters: `match` calls, prompt blocks queried, and blocks held by the best candidate.
        self.lookups = 0
        self.queried_blocks = 0
        self.hit_blocks = 0

    # -- reads ------------------------------------------------------------------------------------------

    def match(self, hashes: Sequence[int], addresses: Sequence[str]) -> list[int]:
        """For each address, how many leading consecutive `hashes` its endpoint holds (0 if unknown).

        A read: LRU order is not touched (only `record` says a block was used).
        """
        self.lookups += 1
        self.queried_blocks += len(hashes)
        owners = self._owners
        if not hashes or hashes[0] not in owners:
            return [0] * len(addresses)  # a new prompt: skip the per-candidate work
        eids, alive = self._resolve(addresses)
        if not alive:
            return [0] * len(addresses)
        # Each endpoint's blocks are prefix-closed (`record` refreshes a prompt's blocks tail first, so a
        # head block is never older than its tail and is never evicted before it), so the candidates
        # holding block k+1 are a subset of those holding block k. Depths are found by bisection: the first
        # block no candidate holds, then only the intervals where the set of holders changes are split.
        # Cost ~ O(distinct depths x log blocks) lookups instead of one per matched block.
        get = owners.get

        def holders(k: int) -> int:
            return alive & get(hashes[k], 0)

        lo, hi = 0, len(hashes)  # holders(lo) != 0; find the first k with holders(k) == 0 (or len)
        first = holders(0)
        if not first:
            return [0] * len(addresses)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if holders(mid):
                lo = mid
            else:
                hi = mid
        end = lo  # last block some candidate holds
        last = holders(end)
        dropped: list[tuple[int, int]] = [(end + 1, last)]  # (depth, mask of endpoints with that depth)
        if first != last:
            stack = [(0, end, first, last)]
            while stack:
                a, b, mask_a, mask_b = stack.pop()
                if mask_a == mask_b:
                    continue
                if b - a == 1:
                    dropped.append((a + 1, mask_a & ~mask_b))  # hold block a, not block b
                    continue
                mid = (a + b) // 2
                mask_mid = holders(mid)
                stack.append((a, mid, mask_a, mask_mid))
                stack.append((mid, b, mask_mid, mask_b))
        # depth_of[eid]; the extra last slot stays 0 and answers for unknown candidates (eid -1).
        depth_of = [0] * (self._next_id + 1)
        for at, mask in dropped:
            if mask:
                # Set bits of `mask` via its binary string: str.find skips the zeros in C.
                digits = bin(mask)[:1:-1]
                eid = digits.find("1")
                while eid >= 0:
                    depth_of[eid] = at
                    eid = digits.find("1", eid + 1)
        result = [depth_of[eid] for eid in eids]
        if result:
            self.hit_blocks += max(result)
        return result

    def _resolve(self, addresses: Sequence[str]) -> tuple[list[int], int]:
        """Candidates' endpoint ids (-1 if unknown) and the OR of their bits. The scheduler usually passes
        the same candidates request after request, so the last answer is kept until an id changes."""
        key = tuple(addresses)
        cached = self._resolved
        if cached is not None and cached[0] == self._id_epoch and cached[1] == key:
            return cached[2], cached[3]
        endpoints = self._endpoints
        eids = [-1 if (state := endpoints.get(address)) is None else state.eid for address in addresses]
        alive = 0
        for eid in set(eids):
            if eid >= 0:
                alive |= self._bits[eid]
        self._resolved = (self._id_epoch, key, eids, alive)
        return eids, alive

    def entries(self, address: str) -> int:
        """Blocks currently held for `address` (0 if unknown)."""
        state = self._endpoints.get(address)
        return 0 if state is None else len(state.lru)

    def room(self, address: str) -> int | None:
        """Blocks `address` can take before it evicts (capacity - entries); None if unknown."""
        state = self._endpoints.get(address)
        return None if state is None else state.capacity - len(state.lru)

    def stats(self) -> PrefixIndexStats:
        """Sizes, a memory estimate and the match counters.

        `memory_bytes_estimate` = sizes of the dict tables + one hash int per entry (within ~1% of
        tracemalloc in the benchmark; the few multi-owner mask ints are not counted).
        `hit_ratio` = hit_blocks / queried_blocks: the share of queried prompt blocks that the best candidate
        of each `match` held (an upper bound on what routing could reuse). O(endpoints): not per request.
        """
        per_endpoint = {address: len(state.lru) for address, state in self._endpoints.items()}
        total = sum(per_endpoint.values())
        return {
            "endpoints": len(per_endpoint),
            "entries_per_endpoint": per_endpoint,
            "total_entries": total,
            "distinct_blocks": len(self._owners),
            "capacity_blocks": sum(state.capacity for state in self._endpoints.values()),
            "memory_bytes_estimate": sys.getsizeof(self._owners)
            + sum(sys.getsizeof(state.lru) for state in self._endpoints.values())
            + total * _INT_BYTES,
            "lookups": self.lookups,
            "queried_blocks": self.queried_blocks,
            "hit_blocks": self.hit_blocks,
            "hit_ratio": self.hit_blocks / self.queried_blocks if self.queried_blocks else 0.0,
        }

    # -- writes -----------------------------------------------------------------------------------------

    def record(self, address: str, hashes: Sequence[int]) -> None:
        """`address` served a prompt with these block hashes: it now holds them, most recently used.

        Blocks are refreshed from last to first so the prompt's first block ends up the most recent: under
        pressure an endpoint loses the tails of old prompts before their heads, as a server's cache does
        (a lost head would make every later block of that prefix unmatchable anyway).

        Contract: `hashes` are a prompt's leading blocks as `block_hashes` makes them (a chain). Together
        with tail-first eviction this keeps each endpoint's blocks prefix-closed, which `match` relies on.
        """
        state = self._endpoints.get(address)
        if state is None:
            state = self._add_endpoint(address, self.default_capacity_blocks)
        capacity = state.capacity
        if capacity <= 0:
            return
        lru = state.lru
        owners = self._owners
        bit = state.bit
        # Beyond `capacity` blocks the head would evict its own tail at once: skip the tail.
        for h in reversed(hashes[:capacity]):
            if h in lru:
                del lru[h]  # re-inserting moves it to the end: most recently used
                lru[h] = None
            else:
                lru[h] = None
                mask = owners.get(h)
                owners[h] = bit if mask is None else mask | bit
        if len(lru) > capacity:
            self._evict(state, len(lru) - capacity)

    def set_capacity(self, address: str, blocks: int) -> None:
        """Capacity of `address` in our 16-token blocks (see `capacity_blocks_for`); shrinking evicts LRU
        blocks at once. Creates the endpoint if unknown, so a scraped cache shape can size it before use."""
        if blocks < 0:
            raise ValueError(f"capacity must be >= 0 blocks, got {blocks} for {address}")
        state = self._endpoints.get(address)
        if state is None:
            self._add_endpoint(address, blocks)
            return
        state.capacity = blocks
        if len(state.lru) > blocks:
            self._evict(state, len(state.lru) - blocks)

    def remove_endpoint(self, address: str) -> None:
        """Forget `address` entirely (it left the pool); its id is reused by the next new endpoint."""
        state = self._endpoints.pop(address, None)
        if state is None:
            return
        self._evict(state, len(state.lru))
        heappush(self._free_ids, state.eid)
        self._id_epoch += 1

    # -- internals --------------------------------------------------------------------------------------

    def _add_endpoint(self, address: str, capacity: int) -> _EndpointBlocks:
        if self._free_ids:
            eid = heappop(self._free_ids)
        else:
            eid = self._next_id
            self._next_id += 1
            self._bits.append(1 << eid)
        state = _EndpointBlocks(eid=eid, bit=self._bits[eid], capacity=capacity)
        self._endpoints[address] = state
        self._id_epoch += 1
        return state

    def _evict(self, state: _EndpointBlocks, count: int) -> None:
        """Drop the `count` least recently used blocks of `state` and clear its bit in `_owners`."""
        lru = state.lru
        owners = self._owners
        bits = self._bits
        keep = ~state.bit
        for h in list(islice(lru, count)):
            del lru[h]
            mask = owners[h] & keep
            if not mask:
                del owners[h]
            elif not mask & (mask - 1):
                owners[h] = bits[mask.bit_length() - 1]  # back to a single owner: share its int object
            else:
                owners[h] = mask
