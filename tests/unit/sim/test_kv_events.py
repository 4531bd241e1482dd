"""The simulated engine's KV-cache events (vLLM's shapes, the simulator's token ids)."""

from __future__ import annotations

from epp.scheduling.plugins.precise_prefix.tokenize import sim_token_ids
from epp_lab.sim.config import EngineConfig
from epp_lab.sim.engine import Engine, SimRequest, block_hashes, prompt_token_count


def submit(engine: Engine, text: str, rid: str, lora: str | None = None) -> SimRequest:
    model = lora or "m"
    req = SimRequest(rid, model, lora, prompt_token_count(text), 2, block_hashes(text, model), text=text)
    engine.submit(req, 0.0)
    return req


def test_stored_blocks_carry_token_ids_and_chain_to_their_parent() -> None:
    engine = Engine(EngineConfig(num_gpu_blocks=100, kv_events=True))
    text = "abcd" * 16 * 3 + "tail"  # 3 full blocks of 16 tokens and a partial one
    submit(engine, text, "1", lora="ad")
    engine.run_until_idle()
    stored = [e for e in engine.kv_events or [] if e["type"] == "BlockStored"]
    assert len(stored) == 1
    event = stored[0]
    hashes = block_hashes(text, "ad")
    assert event["block_hashes"] == hashes[:3] and event["parent_block_hash"] is None
    assert event["token_ids"] == sim_token_ids(text[: 3 * 64]) and event["block_size"] == 16
    assert event["lora_name"] == "ad" and event["medium"] == "GPU"
    # A longer prompt sharing those blocks stores only its new block, chained to the last shared one.
    engine.kv_events.clear()  # type: ignore[union-attr]
    submit(engine, text[: 3 * 64] + "efgh" * 16, "2", lora="ad")
    engine.run_until_idle()
    (event,) = [e for e in engine.kv_events or [] if e["type"] == "BlockStored"]
    assert event["parent_block_hash"] == hashes[2] and len(event["block_hashes"]) == 1


def test_evictions_and_reset_are_announced() -> None:
    engine = Engine(EngineConfig(num_gpu_blocks=8, kv_events=True))
    for i in range(3):
        submit(engine, f"{i:04d}" * 16 * 4, str(i))
        engine.run_until_idle()
    removed = [h for e in engine.kv_events or [] if e["type"] == "BlockRemoved" for h in e["block_hashes"]]
    assert removed and len(removed) == engine.stats.evicted_blocks
    assert engine.reset_prefix_cache()
    assert engine.kv_events and engine.kv_events[-1] == {"type": "AllBlocksCleared"}
    assert not engine.refs and engine.empty == 8


def test_events_are_off_by_default() -> None:
    engine = Engine(EngineConfig(num_gpu_blocks=8))
    submit(engine, "x" * 200, "1")
    engine.run_until_idle()
    assert engine.kv_events is None
