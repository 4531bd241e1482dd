"""The precise prefix-cache scorer and its index, against a KV-event stream recorded from a real vLLM
(tests/fixtures/realengine) and against hand-made events."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from epp.config import ConfigError
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.datalayer.kvevents.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_frames,
)
from epp.scheduling.interfaces import CycleState, SchedulingRequest
from epp.scheduling.plugins.precise_prefix.index import PreciseIndex, chain_keys, root_key
from epp.scheduling.plugins.precise_prefix.scorer import PrecisePrefixParams, PrecisePrefixScorer
from epp.scheduling.plugins.precise_prefix.tokenize import (
    HfTokenizer,
    SimTokenizer,
    sim_token_ids,
    split_messages,
    token_id_prompt,
)

pytest.importorskip("tokenizers")
pytest.importorskip("msgpack")

FIXTURES = Path(__file__).parents[2] / "fixtures" / "realengine"
PROMPTS = json.loads((FIXTURES / "prompts.json").read_text())
SYSTEM = "You are a terse assistant."


def recorded() -> list[tuple[str, EventBatch | None]]:
    """(marker, None) and ("", batch) items of the recorded stream, in order."""
    out: list[tuple[str, EventBatch | None]] = []
    for line in (FIXTURES / "kv_events_raw.jsonl").read_text().splitlines():
        item = json.loads(line)
        if "marker" in item:
            out.append((item["marker"], None))
        elif "frames" in item:
            out.append(("", decode_frames([base64.b64decode(f) for f in item["frames"]])))
    return out


@pytest.fixture(scope="module")
def tokenizer() -> HfTokenizer:
    return HfTokenizer(FIXTURES / "tokenizer")


def keys(ids: list[int], lora: str | None = None) -> list[int]:
    return chain_keys(ids, 128, root_key(lora))


def test_recorded_stream_decodes_in_order() -> None:
    batches = [b for _, b in recorded() if b is not None]
    assert [b.seq for b in batches] == list(range(16))
    assert all(b.topic == "kv-events" and b.dp_rank == 0 for b in batches)
    first = batches[0].events[0]
    assert isinstance(first, BlockStored) and first.parent is None and first.block_size == 128
    assert len(first.block_hashes) == 7 and len(first.token_ids) == 7 * 128 and first.token_ids[0] == 0  # BOS
    assert any(h >= 2**63 for b in batches for e in b.events for h in getattr(e, "block_hashes", ()))
    assert any(isinstance(e, AllBlocksCleared) for b in batches for e in b.events)


def test_index_follows_the_recorded_engine(tokenizer: HfTokenizer) -> None:
    """Keys from the prompts, tokenized as vLLM does, match the blocks the engine announced, step by step."""
    a = keys(tokenizer.encode_text(PROMPTS["A"]))
    b = keys(tokenizer.encode_text(PROMPTS["B"]))
    chat = keys(
        tokenizer.encode_chat(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS["chat_user"]}]
        )
    )
    lora = keys(tokenizer.encode_text(PROMPTS["L"]), "lora-1")
    base = keys(tokenizer.encode_text(PROMPTS["L"]))
    token_ids = keys(PROMPTS["T_ids"])
    index = PreciseIndex()
    seen: dict[str, dict[str, int]] = {}
    index.restarted("e")
    for marker, batch in recorded():
        if batch is None:
            seen[marker.split(":")[0].split(" (")[0]] = {
                name: index.match(k, ["e"])[0]
                for name, k in (
                    ("A", a),
                    ("B", b),
                    ("chat", chat),
                    ("lora", lora),
                    ("base", base),
                    ("T", token_ids),
                )
            }
        else:
            index.apply("e", batch)
    assert len(a) == 7 and seen["A again"]["A"] == 7  # A's 7 full blocks (999 tokens)
    assert seen["A again"]["B"] == 3  # B shares A's first 3 blocks (cached_tokens 384)
    assert seen["B"]["B"] == 3 and seen["chat"]["B"] == 8  # then B's own 5 more
    assert seen["LoRA"]["chat"] == 3  # the chat template, rendered and tokenized as vLLM does
    assert seen["same prompt on base model"] == {**seen["same prompt on base model"], "lora": 3, "base": 0}
    assert seen["6 different 1000-token prompts"]["base"] == 3  # adapter and base blocks never mix
    assert seen["A after evictions"]["A"] == 0  # evicted, tail first, and the index saw it
    assert seen["A after reset"]["A"] == 7  # re-stored; the reset's AllBlocksCleared comes with the next step
    view = index.view("e")
    assert view is not None and view.synced and view.orphans == 0 and view.clears == 1
    assert index.match(token_ids, ["e"]) == [2]  # a token-id prompt: the ids as given, no BOS
    assert index.match(a, ["e"]) == [7]  # A again after the reset; D's output-completed block chains too


def test_stored_block_with_an_unknown_parent_marks_the_view_incomplete() -> None:
    index = PreciseIndex()
    index.restarted("e")
    index.apply("e", EventBatch(0, events=(BlockStored((5,), parent=99, token_ids=(1,) * 4, block_size=4),)))
    view = index.view("e")
    assert view is not None and not view.synced and view.orphans == 1 and index.blocks("e") == 0
    index.apply("e", EventBatch(1, events=(AllBlocksCleared(),)))
    assert view.synced


def test_over_capacity_drops_the_view() -> None:
    index = PreciseIndex(max_blocks_per_endpoint=2)
    index.restarted("e")
    index.apply("e", EventBatch(0, events=(BlockStored((1, 2, 3), None, tuple(range(12)), 4),)))
    view = index.view("e")
    assert view is not None and index.blocks("e") == 0 and not view.synced and "removals lost" in view.reason


def test_match_counts_leading_blocks_per_candidate_and_removal() -> None:
    index = PreciseIndex()
    ids = list(range(16))
    k = chain_keys(ids, 4, root_key(None))
    for address, n in (("a", 4), ("b", 2)):
        index.restarted(address)
        index.apply(
            address, EventBatch(0, events=(BlockStored(tuple(range(n)), None, tuple(ids[: 4 * n]), 4),))
        )
    assert index.match(k, ["a", "b", "c"]) == [4, 2, 0]
    index.apply("a", EventBatch(1, events=(BlockRemoved((1,)),)))  # a hole: the engine stops there too
    assert index.match(k, ["a", "b"]) == [1, 2]
    index.add_pending("c", k[:3])
    assert index.match(k, ["a", "b", "c"]) == [1, 2, 3]
    index.drop_pending("c", k[:3])
    index.remove_endpoint("b")
    assert index.match(k, ["a", "b", "c"]) == [1, 0, 0]


def request(
    prompt: str, path: str = "/v1/completions", model: str = "m", tokens: int | None = None
) -> SchedulingRequest:
    count = tokens if tokens is not None else -(-len(prompt) // 4)
    return SchedulingRequest("r", model, model, prompt=prompt, prompt_tokens=count, headers={":path": path})


def scorer(**params: object) -> PrecisePrefixScorer:
    return PrecisePrefixScorer(PrecisePrefixParams(tokenizer="simulator", **params))  # type: ignore[arg-type]


def store(s: PrecisePrefixScorer, address: str, text: str, seq: int = 0, lora: str | None = None) -> None:
    """The events the simulator sends for `text` (16-token blocks, sim token ids)."""
    ids = sim_token_ids(text)
    n = len(ids) // 16
    s.apply(
        address,
        EventBatch(
            seq,
            events=(
                BlockStored(tuple(range(1000 * seq, 1000 * seq + n)), None, tuple(ids[: 16 * n]), 16, lora),
            ),
        ),
    )


def test_score_is_the_share_of_prompt_blocks_each_endpoint_reports() -> None:
    s = scorer(fallback=False)
    a, b, c = Endpoint("a:1"), Endpoint("b:1"), Endpoint("c:1")
    text = "x" * 64 * 8
    for e in (a, b, c):
        s.restarted(e.address)
    store(s, "a:1", text)
    store(s, "b:1", text[: 64 * 2])
    scores = s.score(request(text), CycleState(), [a, b, c])
    assert scores == [1.0, 0.25, 0.0]
    # vLLM recomputes a prompt's last token: a prompt of exactly 8 blocks can reuse 7 of them.
    assert s.predicted_tokens(request(text), CycleState(), a) == 7 * 16
    assert s.predicted_tokens(request(text + "y"), CycleState(), a) == 8 * 16


def test_load_guard_discounts_an_endpoint_far_ahead() -> None:
    s = scorer(fallback=False, load_gap=2)
    a, b = Endpoint("a:1"), Endpoint("b:1")
    text = "x" * 64 * 4
    s.restarted("a:1")
    store(s, "a:1", text)
    a.inflight_requests = 6
    assert s.score(request(text), CycleState(), [a, b]) == [1 / 3, 0.0]  # 2 / (6 - (0 + 2) + 2)


def test_incomplete_view_falls_back_to_the_approximate_index() -> None:
    s = scorer()
    a, b = Endpoint("a:1"), Endpoint("b:1")
    text = "y" * 64 * 8
    req, state = request(text), CycleState()
    s.pre_request(req, state, a)  # routed there: the approximate index learns it
    s.response_complete(req, state, a, 200)
    assert s.score(req, CycleState(), [a, b]) == [1.0, 0.0]  # no events yet: not synced, approximate
    s.restarted("a:1")  # events from the publisher's start: the precise view decides alone
    assert s.score(req, CycleState(), [a, b]) == [0.0, 0.0]
    s.desynced("a:1", "sequence gap")
    assert s.score(req, CycleState(), [a, b]) == [1.0, 0.0]


def test_pending_blocks_count_until_the_request_completes() -> None:
    s = scorer(fallback=False)
    a, b = Endpoint("a:1"), Endpoint("b:1")
    for e in (a, b):
        s.restarted(e.address)
    text = "z" * 64 * 4
    first, state = request(text), CycleState()
    s.pre_request(first, state, a)
    assert s.score(request(text), CycleState(), [a, b]) == [1.0, 0.0]  # in flight on a: follow it
    s.response_complete(first, state, a, 200)
    assert s.score(request(text), CycleState(), [a, b]) == [0.0, 0.0]  # only events say what stayed


def test_adapters_and_base_model_never_share_blocks() -> None:
    s = scorer(fallback=False, base_model="m")
    a = Endpoint("a:1")
    s.restarted("a:1")
    text = "w" * 64 * 2
    store(s, "a:1", text, lora="ad")
    assert s.score(request(text, model="ad"), CycleState(), [a]) == [1.0]
    assert s.score(request(text, model="m"), CycleState(), [a]) == [0.0]


def test_chat_is_rendered_from_the_serialized_messages(tokenizer: HfTokenizer) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi <b>there</b>"}]
    assert split_messages("<|system|>" + SYSTEM + "<|user|>hi <b>there</b>") == messages
    assert split_messages("plain text") == []
    ids = tokenizer.encode_chat(messages)
    assert ids[0] == 0 and ids.count(0) == 1  # one BOS, from the template
    assert tokenizer.encode_text("def f():")[0] == 0  # completions: the post-processor adds BOS


def test_token_id_prompts_are_used_as_given() -> None:
    assert token_id_prompt("1,2,3", 3) == [1, 2, 3]
    assert token_id_prompt("1,2,3", 2) is None  # a text prompt that looks like numbers
    assert token_id_prompt("hello", 2) is None


def test_sim_tokenizer_matches_the_simulator() -> None:
    from epp_lab.sim.openai import chat_prompt

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    assert SimTokenizer().encode_chat(messages) == sim_token_ids(chat_prompt(messages))
    assert len(sim_token_ids("abcdefghi")) == 3  # ceil(9 / 4), as the simulator counts tokens


def test_parameters_are_checked() -> None:
    with pytest.raises(ConfigError, match="tokenizer"):
        PrecisePrefixParams()
    with pytest.raises(ConfigError, match=r"no tokenizer\.json"):
        PrecisePrefixScorer(PrecisePrefixParams(tokenizer="/nonexistent"))


def test_built_without_an_event_loop_it_does_not_subscribe() -> None:
    s = scorer()
    s.attach(EndpointPool([Endpoint("a:1")]))
    assert s.subscriber is not None and not s.subscriber._started  # type: ignore[attr-defined]
    assert s.events_address(Endpoint("10.0.0.1:8000")) == "tcp://10.0.0.1:5557"
    offset = scorer(events_port_offset=1, replay_port_offset=1)
    assert offset.events_address(Endpoint("127.0.0.1:8000")) == "tcp://127.0.0.1:8001"
    assert offset.replay_address(Endpoint("127.0.0.1:8000")) == "tcp://127.0.0.1:8002"


def test_chunked_cached_tokenization_equals_whole_texts(tokenizer: HfTokenizer) -> None:
    assert tokenizer.chunked  # byte-level BPE: the load-time self-check passed
    for name in ("A", "B", "chat_user", "D"):
        text = PROMPTS[name] * 3
        assert tokenizer.encode_text(text) == tokenizer._whole(text, True)
        assert tokenizer.encode_text(text) == tokenizer.encode_text(text)  # from the cache this time
    limited = tokenizer.encode_text(PROMPTS["A"] * 3, limit=300)
    assert len(limited) >= 300 and limited == tokenizer._whole(PROMPTS["A"] * 3, True)[: len(limited)]


def test_split_points_are_between_words_and_content_defined() -> None:
    from epp.scheduling.plugins.precise_prefix.tokenize import split_points

    text = "word " * 1000
    points = split_points(text, every=100)
    assert points and all(text[p] == " " and text[p - 1] != " " and text[p + 1] != " " for p in points)
    longer = split_points(text + "more text " * 50, every=100)
    assert longer[: len(points) - 1] == points[:-1]  # a shared prefix is cut at the same places
    assert split_points("x" * 5000, every=100) == []  # no space: one chunk
