"""Precise prefix-cache index: the blocks each engine reports holding, keyed by our own chained hash.

The engines announce what they cache (`epp.datalayer.kvevents`): `BlockStored` with the blocks' token ids,
the engine's block hashes and the parent block's hash; `BlockRemoved` by engine hash; `AllBlocksCleared`.
vLLM's hash (sha256 of a pickle, seeded, including adapter paths) is not something the picker should
reproduce, so every block gets a key of our own, computed the same way from a prompt's token ids:

    k_0     = xxh64(b"epp-precise-v1\\0" + len-prefixed lora name and cache salt)     (the root)
    k_{i+1} = xxh64(token ids of block i as little-endian uint32 (uint64 if any id >= 2**32), seed=k_i)

For a `BlockStored`, k_0 is the parent's key (looked up by the parent's engine hash on that endpoint) or
the root of its `lora_name` when it has no parent; each endpoint maps engine hash -> key. A request's
prompt, tokenized as the engine tokenizes it, gets the same keys, so `match` counts for each candidate
the leading blocks of the prompt it holds, exactly as the engine will find them.

Per endpoint, besides the stored blocks: *pending* blocks, the prompts of requests sent there that have not
completed (the engine computes and caches them while they run; their events arrive only after the prefill),
counted so that a burst of requests sharing a new prefix follows the first one. An endpoint holds key k iff
it has k stored or pending; `_owners[k]` is the bitmask of such endpoints (bit = the endpoint's id).

View state per endpoint: `synced` is True from the publisher's start (first message seq 0, or a restart)
until a loss (sequence gap, a parent we never saw, over capacity); then it is False until the engine
restarts or clears its cache. The scorer falls back to the approximate index for endpoints not synced.

Memory is bounded: stored blocks per endpoint <= `max_blocks_per_endpoint` (more means removals were lost:
the view is dropped and marked not synced); pending blocks <= in-flight requests x `max_blocks`. One stored
block costs ~300 bytes (engine-hash dict entry, key refcount entry, owner mask entry, the ints).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from heapq import heappop, heappush

from xxhash import xxh64_intdigest

from epp.datalayer.kvevents.events import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch

_FORMAT = b"epp-precise-v1"
DEFAULT_MAX_BLOCKS_PER_ENDPOINT = 131_072  # 2M tokens of 16-token blocks; 16.7M of vLLM-CPU's 128
GPU_MEDIA = (None, "GPU", "gpu")  # where the engine serves cached blocks from (events say "GPU" on CPU too)


@lru_cache(maxsize=1024)
def root_key(lora: str | None, salt: str = "") -> int:
    """k_0 for prompts of `lora` (None: the base model) with `cache_salt` `salt`."""
    name = (lora or "").encode("utf-8", "surrogatepass")
    salt_b = salt.encode("utf-8", "surrogatepass")
    return xxh64_intdigest(b"%s\x00%d:%s%d:%s" % (_FORMAT, len(name), name, len(salt_b), salt_b))


def _packed(token_ids: Sequence[int]) -> tuple[bytes, int]:
    """Token ids as little-endian bytes and the bytes per id (4, or 8 when an id needs it)."""
    try:
        data = array("I", token_ids)
    except OverflowError:
        data = array("Q", token_ids)
    if sys.byteorder != "little":  # pragma: no cover - x86 and ARM Linux are little-endian
        data.byteswap()
    return data.tobytes(), data.itemsize


def chain_keys(
    token_ids: Sequence[int], block_size: int, parent: int, max_blocks: int | None = None
) -> list[int]:
    """Keys of the full `block_size`-token blocks of `token_ids` chained from `parent` (at most
    `max_blocks`): k_{i+1} = xxh64(block i's ids, seed=k_i). A trailing partial block is not keyed."""
    count = len(token_ids) // block_size
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count <= 0:
        return []
    data, width = _packed(token_ids[: count * block_size])
    step = block_size * width
    out: list[int] = []
    h = parent
    for start in range(0, count * step, step):
        h = xxh64_intdigest(data[start : start + step], h)
        out.append(h)
    return out


def first_block_salt(event: BlockStored) -> str:
    """The cache salt of a prompt's first block: vLLM lists it in the first block's extra keys beside the
    adapter name (untagged), so any string there other than the adapter's name."""
    if event.parent is not None or not event.extra_keys:
        return ""
    keys = event.extra_keys[0]
    if not isinstance(keys, list | tuple):
        return ""
    return "".join(k for k in keys if isinstance(k, str) and k != event.lora_name)


@dataclass(slots=True, eq=False)
class EndpointView:
    """What one endpoint holds, as far as its events (and the requests sent there) tell."""

    eid: int
    bit: int
    blocks: dict[int, int] = field(default_factory=dict)  # engine hash -> key (stored blocks)
    refs: dict[int, int] = field(default_factory=dict)  # key -> stored count + pending count
    pending: int = 0  # pending (speculative) block references
    block_size: int = 0  # from the events; 0 until the first BlockStored
    synced: bool = False  # complete since the publisher's start (see the module docstring)
    reason: str = "no events yet"  # why not synced
    stored_events: int = 0
    removed_blocks: int = 0
    orphans: int = 0  # stored blocks whose parent we never saw (lost events)
    clears: int = 0
    lora_names: set[str] = field(default_factory=set)


class PreciseIndex:
    """Engine-reported blocks per endpoint, keyed by `chain_keys`; see the module docstring."""

    __slots__ = ("_bits", "_free_ids", "_next_id", "_owners", "max_blocks_per_endpoint", "views")

    def __init__(self, max_blocks_per_endpoint: int = DEFAULT_MAX_BLOCKS_PER_ENDPOINT) -> None:
        self.max_blocks_per_endpoint = max_blocks_per_endpoint
        self.views: dict[str, EndpointView] = {}
        self._owners: dict[int, int] = {}
        self._free_ids: list[int] = []
        self._next_id = 0
        self._bits: list[int] = []

    # -- reads ------------------------------------------------------------------------------------------

    def view(self, address: str) -> EndpointView | None:
        return self.views.get(address)

    def match(self, keys: Sequence[int], addresses: Sequence[str]) -> list[int]:
        """For each address, how many leading `keys` its endpoint holds (stored or pending).

        One dict lookup per block while some candidate still holds the prefix: O(matched blocks +
        candidates); the engine's own lookup stops at its first missing block, and so does this."""
        owners = self._owners
        if not keys or keys[0] not in owners:
            return [0] * len(addresses)
        views = self.views
        bits = [(v.bit if (v := views.get(a)) is not None else 0) for a in addresses]
        alive = 0
        for b in bits:
            alive |= b
        depth: dict[int, int] = {}
        get = owners.get
        for i, key in enumerate(keys):
            held = alive & get(key, 0)
            if held != alive:
                dropped = alive & ~held
                for b in bits:
                    if b & dropped and b not in depth:
                        depth[b] = i
                alive = held
            if not alive:
                break
        n = len(keys)
        return [depth.get(b, n) if b else 0 for b in bits]

    def blocks(self, address: str) -> int:
        view = self.views.get(address)
        return 0 if view is None else len(view.blocks)

    def total_blocks(self) -> int:
        return sum(len(v.blocks) for v in self.views.values())

    # -- events -----------------------------------------------------------------------------------------

    def apply(self, address: str, batch: EventBatch) -> None:
        view = self._view(address)
        for event in batch.events:
            if isinstance(event, BlockStored):
                self._stored(address, view, event)
            elif isinstance(event, BlockRemoved):
                if event.medium in GPU_MEDIA:
                    self._removed(view, event.block_hashes)
            elif isinstance(event, AllBlocksCleared) and event.medium in GPU_MEDIA:
                self._clear(view)
                view.clears += 1
                self._mark_synced(view)

    def restarted(self, address: str) -> None:
        """The publisher (re)started: the engine's cache is empty, the view exact from here."""
        view = self._view(address)
        self._clear(view)
        self._mark_synced(view)

    def desynced(self, address: str, reason: str) -> None:
        """Events were lost: what we know may be wrong both ways (missed stores and missed removals).
        Known blocks stay (most are still there) but the view is no longer trusted alone."""
        view = self._view(address)
        view.synced = False
        view.reason = reason

    def remove_endpoint(self, address: str) -> None:
        view = self.views.pop(address, None)
        if view is None:
            return
        self._clear(view, keep_pending=False)
        heappush(self._free_ids, view.eid)

    def _stored(self, address: str, view: EndpointView, event: BlockStored) -> None:
        if event.medium not in GPU_MEDIA:
            return
        view.stored_events += 1
        view.block_size = event.block_size
        if event.lora_name:
            view.lora_names.add(event.lora_name)
        if event.parent is None:
            parent = root_key(event.lora_name, first_block_salt(event))
        else:
            found = view.blocks.get(event.parent)
            if found is None:
                view.orphans += 1  # its parent was announced before we listened, or lost
                if view.synced:
                    view.synced = False
                    view.reason = "a stored block's parent was never announced"
                return
            parent = found
        keys = chain_keys(event.token_ids, event.block_size, parent)
        blocks = view.blocks
        for engine_hash, key in zip(event.block_hashes, keys, strict=False):
            old = blocks.get(engine_hash)
            if old == key:
                continue
            if old is not None:
                self._unref(view, old)
            blocks[engine_hash] = key
            self._ref(view, key)
        if len(blocks) > self.max_blocks_per_endpoint:
            # More blocks than any engine holds: removals were lost. Start over, untrusted.
            self._clear(view)
            view.synced = False
            view.reason = f"over {self.max_blocks_per_endpoint} blocks (removals lost)"

    def _removed(self, view: EndpointView, hashes: Iterable[int]) -> None:
        blocks = view.blocks
        for engine_hash in hashes:
            key = blocks.pop(engine_hash, None)
            if key is not None:
                view.removed_blocks += 1
                self._unref(view, key)

    # -- pending (speculative) blocks -------------------------------------------------------------------

    def add_pending(self, address: str, keys: Sequence[int]) -> None:
        view = self._view(address)
        for key in keys:
            self._ref(view, key)
        view.pending += len(keys)

    def drop_pending(self, address: str, keys: Sequence[int]) -> None:
        view = self.views.get(address)
        if view is None:
            return
        for key in keys:
            self._unref(view, key)
        view.pending -= len(keys)

    # -- internals --------------------------------------------------------------------------------------

    def _view(self, address: str) -> EndpointView:
        view = self.views.get(address)
        if view is None:
            if self._free_ids:
                eid = heappop(self._free_ids)
            else:
                eid = self._next_id
                self._next_id += 1
                self._bits.append(1 << eid)
            view = self.views[address] = EndpointView(eid=eid, bit=self._bits[eid])
        return view

    @staticmethod
    def _mark_synced(view: EndpointView) -> None:
        view.synced = True
        view.reason = ""

    def _ref(self, view: EndpointView, key: int) -> None:
        refs = view.refs
        count = refs.get(key, 0)
        refs[key] = count + 1
        if not count:
            mask = self._owners.get(key)
            self._owners[key] = view.bit if mask is None else mask | view.bit

    def _unref(self, view: EndpointView, key: int) -> None:
        refs = view.refs
        count = refs.get(key, 0) - 1
        if count > 0:
            refs[key] = count
            return
        refs.pop(key, None)
        mask = self._owners.get(key, 0) & ~view.bit
        if mask:
            self._owners[key] = mask
        else:
            self._owners.pop(key, None)

    def _clear(self, view: EndpointView, keep_pending: bool = True) -> None:
        """Forget the stored blocks (pending ones stay: those requests still run there)."""
        for key in view.blocks.values():
            self._unref(view, key)
        view.blocks.clear()
        if not keep_pending:
            for key in list(view.refs):
                view.refs[key] = 1
                self._unref(view, key)
            view.pending = 0
