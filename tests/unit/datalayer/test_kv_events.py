"""KV-event decoding and the subscriber's sequence logic (no sockets: `_deliver` driven directly)."""

from __future__ import annotations

import msgpack
import pytest
from support.kvevents import RecordingSink

from epp.datalayer.endpoints import EndpointPool
from epp.datalayer.kvevents.events import (
    SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    EventBatch,
    decode_frames,
)
from epp.datalayer.kvevents.subscriber import KVEventSubscriber, SequenceTracker, StreamStats


def frames(seq: int, events: list, topic: bytes = b"kv") -> list[bytes]:
    return [topic, SEQ.pack(seq), msgpack.packb([1.5, events, 0])]


def test_decodes_map_and_array_encodings() -> None:
    stored = {"type": "BlockStored", "block_hashes": [2**64 - 1, 7], "parent_block_hash": None,
              "token_ids": list(range(8)), "block_size": 4, "lora_name": "ad", "medium": "GPU",
              "extra_keys": [["ad"], ["ad"]]}  # fmt: skip
    batch = decode_frames(frames(3, [stored, ["BlockRemoved", [7], "GPU"], {"type": "AllBlocksCleared"},
                                     {"type": "SomethingNew"}]))  # fmt: skip
    assert batch.seq == 3 and batch.topic == "kv" and batch.ts == 1.5 and batch.unknown == 1
    assert batch.events == (
        BlockStored((2**64 - 1, 7), None, tuple(range(8)), 4, "ad", (["ad"], ["ad"]), "GPU"),
        BlockRemoved((7,), "GPU"),
        AllBlocksCleared(),
    )
    # 32-byte hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0) read as one int
    raw = decode_frames(frames(0, [{"type": "BlockRemoved", "block_hashes": [b"\x01" * 32]}]))
    assert raw.events == (BlockRemoved((int.from_bytes(b"\x01" * 32, "big"),)),)


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        ([b"kv", SEQ.pack(0)], "3 frames"),
        ([b"kv", b"\x00", msgpack.packb([0, [], 0])], "8 bytes"),
        ([b"kv", SEQ.pack(0), b"\xc1"], "msgpack"),
        ([b"kv", SEQ.pack(0), msgpack.packb({"a": 1})], "payload must be"),
        (
            frames(0, [{"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 4}]),
            "1 token",
        ),
        (frames(0, [{"type": "BlockRemoved", "block_hashes": ["x"]}]), "int or bytes"),
    ],
)
def test_bad_messages_are_decode_errors(message: list[bytes], problem: str) -> None:
    with pytest.raises(DecodeError, match=problem):
        decode_frames(message)


def test_sequence_tracker_verdicts() -> None:
    t = SequenceTracker()
    assert t.check(0) == "start"
    t.advance(0)
    assert t.check(1) == "next"
    t.advance(1)
    assert t.check(3) == "gap"
    assert t.check(0) == "start"  # the publisher restarted
    assert t.check(1) == "restart-missed"
    joined = SequenceTracker()
    assert joined.check(5) == "joined"


async def test_losses_and_restarts_reach_the_sink() -> None:
    sink = RecordingSink()
    sub = KVEventSubscriber(EndpointPool(), sink, lambda e: None)
    tracker, stats = SequenceTracker(), StreamStats()
    for seq in (0, 1, 3, 4, 0, 1, 7):
        await sub._deliver("a", EventBatch(seq), tracker, stats, None)
    assert sink.calls == [
        ("restarted", None), ("apply", 0), ("apply", 1),
        ("desynced", "sequence gap"), ("apply", 3), ("apply", 4),
        ("restarted", None), ("apply", 0), ("apply", 1),
        ("desynced", "sequence gap"), ("apply", 7),
    ]  # fmt: skip
    assert (stats.messages, stats.gaps, stats.restarts, stats.last_seq) == (7, 2, 1, 7)
    late = RecordingSink()
    await sub._deliver("b", EventBatch(9), SequenceTracker(), StreamStats(), None)
    sub.sink = late
    await sub._deliver("b", EventBatch(9), SequenceTracker(), StreamStats(), None)
    assert late.calls == [("desynced", "joined after the publisher's start"), ("apply", 9)]
