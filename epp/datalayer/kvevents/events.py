"""vLLM's KV-cache events as they arrive over ZMQ, decoded into plain values.

Wire format (vLLM `--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'`): one
multipart message per engine step that produced events,

    frame 0   topic (UTF-8; vLLM's default is empty, llm-d uses "kv@<ip>:<port>@<model>")
    frame 1   seq: 8-byte big-endian unsigned, per publisher (engine / data-parallel rank), 0 at every start
    frame 2   msgpack [ts (float unix seconds), [event, ...], dp_rank]

and each event a msgpack map with a `type` key (older vLLM: an array whose first element is the tag):

    BlockStored       block_hashes [h...], parent_block_hash (None for a prompt's first block), token_ids
                      (block_size x len(block_hashes), flat), block_size, lora_name (None for the base
                      model), extra_keys (per block), medium
    BlockRemoved      block_hashes, medium
    AllBlocksCleared  -

Block hashes are the engine's own (unsigned 64-bit ints by default; 32 raw bytes with
`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`, read here as one big int). Only full blocks are announced; a
block completed by generated tokens is announced later with the prompt's last full block as parent.
Events with a `medium` other than GPU (CPU offload tiers) describe copies the engine cannot serve from
without loading them back; they are kept and the index decides what to do with them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

SEQ = struct.Struct(">Q")


class DecodeError(ValueError):
    """A message that is not a KV-event batch (wrong frame count, bad msgpack, unknown shape)."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[int, ...]
    parent: int | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_name: str | None = None
    extra_keys: tuple[Any, ...] = ()
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[int, ...]
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    medium: str | None = None


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One ZMQ message: the events of one engine step."""

    seq: int
    ts: float = 0.0
    events: tuple[Event, ...] = ()
    dp_rank: int = 0
    topic: str = ""
    unknown: int = 0  # events of types this decoder does not know (skipped)


def _hash(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bytes | bytearray):
        return int.from_bytes(value, "big")
    raise DecodeError(f"block hash must be an int or bytes, got {type(value).__name__}")


def _hashes(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise DecodeError("block_hashes must be a list")
    return tuple(_hash(h) for h in value)


# Field order of the array-like (older) encoding, after the tag.
_ARRAY_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": ("medium",),
}


def decode_event(raw: Any) -> Event | None:
    """One event (a map with `type`, or a tagged array); None for an unknown type."""
    if isinstance(raw, list | tuple) and raw and isinstance(raw[0], str):
        names = _ARRAY_FIELDS.get(raw[0])
        if names is None:
            return None
        raw = {"type": raw[0], **dict(zip(names, raw[1:], strict=False))}
    if not isinstance(raw, dict):
        raise DecodeError(f"an event must be a map, got {type(raw).__name__}")
    kind = raw.get("type")
    medium = raw.get("medium")
    medium = medium if isinstance(medium, str) else None
    if kind == "BlockStored":
        hashes = _hashes(raw.get("block_hashes"))
        tokens = raw.get("token_ids")
        size = raw.get("block_size")
        if not isinstance(tokens, list | tuple) or not isinstance(size, int) or size <= 0:
            raise DecodeError("BlockStored needs token_ids and a positive block_size")
        if len(tokens) != size * len(hashes):
            raise DecodeError(
                f"BlockStored: {len(tokens)} token ids for {len(hashes)} blocks of {size} tokens"
            )
        parent = raw.get("parent_block_hash")
        lora = raw.get("lora_name")
        extra = raw.get("extra_keys")
        return BlockStored(
            block_hashes=hashes,
            parent=None if parent is None else _hash(parent),
            token_ids=tuple(tokens),
            block_size=size,
            lora_name=lora if isinstance(lora, str) else None,
            extra_keys=tuple(extra) if isinstance(extra, list | tuple) else (),
            medium=medium,
        )
    if kind == "BlockRemoved":
        return BlockRemoved(_hashes(raw.get("block_hashes")), medium)
    if kind == "AllBlocksCleared":
        return AllBlocksCleared(medium)
    return None


def decode_payload(seq: int, payload: bytes, topic: str = "") -> EventBatch:
    """The msgpack payload `[ts, [events], dp_rank]` of message `seq`."""
    import msgpack  # the `precise` extra; imported here so the picker starts without it

    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as err:  # msgpack raises several unrelated types
        raise DecodeError(f"payload is not msgpack: {err}") from None
    if not isinstance(body, list | tuple) or len(body) < 2 or not isinstance(body[1], list | tuple):
        raise DecodeError("payload must be [ts, [events...], dp_rank]")
    events: list[Event] = []
    unknown = 0
    for raw in body[1]:
        event = decode_event(raw)
        if event is None:
            unknown += 1
        else:
            events.append(event)
    ts = body[0] if isinstance(body[0], int | float) else 0.0
    rank = body[2] if len(body) > 2 and isinstance(body[2], int) else 0
    return EventBatch(seq=seq, ts=float(ts), events=tuple(events), dp_rank=rank, topic=topic, unknown=unknown)


def decode_frames(frames: list[bytes]) -> EventBatch:
    """A whole ZMQ message `[topic, seq, payload]`."""
    if len(frames) != 3:
        raise DecodeError(f"expected 3 frames [topic, seq, payload], got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != SEQ.size:
        raise DecodeError(f"sequence frame must be 8 bytes, got {len(seq)}")
    return decode_payload(SEQ.unpack(seq)[0], payload, topic.decode("utf-8", "replace"))
