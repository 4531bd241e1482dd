"""Approximate prefix index: block hashing and the per-endpoint bounded LRU."""

from __future__ import annotations

import random

import pytest

from epp.scheduling.plugins.prefix_cache.index import (
    PrefixIndex,
    block_hashes,
    capacity_blocks_for,
)

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def text_of(blocks: int, seed: int = 0, block_chars: int = 64) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(blocks * block_chars))


def hs(*values: int) -> list[int]:
    """Synthetic block hashes (the index treats them as opaque integers)."""
    return list(values)


# -- block_hashes --------------------------------------------------------------------------------------


def test_hashes_are_deterministic_64_bit_and_one_per_full_block() -> None:
    text = text_of(5)
    first = block_hashes(text, seed_model="m")
    assert first == block_hashes(text, seed_model="m")
    assert len(first) == 5
    assert len(set(first)) == 5
    assert all(0 <= h < 2**64 for h in first)


def test_same_prefix_gives_same_leading_hashes() -> None:
    prefix = text_of(3)
    one = block_hashes(prefix + text_of(4, seed=1), seed_model="m")
    two = block_hashes(prefix + text_of(2, seed=2), seed_model="m")
    assert one[:3] == two[:3]
    assert one[3] != two[3]


@pytest.mark.parametrize(
    ("model", "salt"), [("other-model", ""), ("m", "tenant-a"), ("m", "tenant-b"), ("m\x00", "")]
)
def test_model_and_cache_salt_change_every_hash(model: str, salt: str) -> None:
    text = text_of(4)
    base = block_hashes(text, seed_model="m")
    other = block_hashes(text, seed_model=model, cache_salt=salt)
    assert len(other) == len(base)
    assert not set(base) & set(other)


def test_model_and_salt_fields_do_not_run_together() -> None:
    text = text_of(2)
    assert block_hashes(text, seed_model="ab", cache_salt="c") != block_hashes(
        text, seed_model="a", cache_salt="bc"
    )


def test_change_in_block_k_changes_hashes_from_k_on() -> None:
    text = text_of(6)
    k = 3
    pos = k * 64 + 10
    changed = text[:pos] + ("X" if text[pos] != "X" else "Y") + text[pos + 1 :]
    base = block_hashes(text, seed_model="m")
    other = block_hashes(changed, seed_model="m")
    assert base[:k] == other[:k]
    assert all(b != o for b, o in zip(base[k:], other[k:], strict=True))


def test_same_block_text_after_different_prefix_hashes_differently() -> None:
    block = text_of(1, seed=9)
    one = block_hashes(text_of(1, seed=1) + block, seed_model="m")
    two = block_hashes(text_of(1, seed=2) + block, seed_model="m")
    assert one[1] != two[1]


def test_partial_trailing_block_is_ignored() -> None:
    text = text_of(3)
    base = block_hashes(text, seed_model="m")
    assert block_hashes(text + "partial block", seed_model="m") == base
    assert block_hashes(text[:-1], seed_model="m") == base[:2]
    assert block_hashes("x" * 63, seed_model="m") == []
    assert block_hashes("", seed_model="m") == []


def test_max_blocks_caps_the_work() -> None:
    text = text_of(300)
    full = block_hashes(text, seed_model="m")
    assert len(full) == 256
    assert block_hashes(text, seed_model="m", max_blocks=10) == full[:10]
    assert block_hashes(text, seed_model="m", max_blocks=0) == []


def test_block_chars_counts_characters_for_non_ascii_text() -> None:
    text = "é" * 64 + "日本" * 32 + "tail"
    hashes = block_hashes(text, seed_model="m")
    assert len(hashes) == 2
    assert block_hashes(text[:64] + "x" * 64, seed_model="m")[0] == hashes[0]


def test_ascii_and_non_ascii_paths_agree_on_shared_blocks() -> None:
    # An ASCII prefix must hash the same whether or not a later block contains non-ASCII characters.
    ascii_text = text_of(3)
    assert block_hashes(ascii_text + "ü" * 64, seed_model="m")[:3] == block_hashes(ascii_text, seed_model="m")


def test_custom_block_chars() -> None:
    text = text_of(4, block_chars=64)
    assert len(block_hashes(text, seed_model="m", block_chars=32)) == 8
    with pytest.raises(ValueError):
        block_hashes(text, seed_model="m", block_chars=0)


def test_capacity_conversion_from_server_cache_shape() -> None:
    assert capacity_blocks_for(2000, 16) == 2000
    assert capacity_blocks_for(1000, 32) == 2000
    assert capacity_blocks_for(10, 8) == 5
    with pytest.raises(ValueError):
        capacity_blocks_for(0, 16)


# -- match ---------------------------------------------------------------------------------------------


def test_match_counts_leading_consecutive_blocks_only() -> None:
    index = PrefixIndex()
    index.record(A, hs(1, 2, 3, 4, 5))
    # Chained hashes: a prompt that diverges at block 2 has different hashes from there on.
    assert index.match(hs(1, 2, 13, 14, 15), [A]) == [2]
    assert index.match(hs(1, 2), [A]) == [2]
    assert index.match(hs(9, 1, 2), [A]) == [0]
    assert index.match(hs(1, 2, 3, 4, 5, 6, 7), [A]) == [5]
    assert index.match([], [A]) == [0]


def test_match_depths_survive_tail_first_eviction() -> None:
    index = PrefixIndex(default_capacity_blocks=6)
    index.record(A, hs(1, 2, 3, 4, 5))
    index.record(A, hs(21, 22, 23))  # evicts the oldest: the first prompt's tail (5, then 4)
    assert index.match(hs(1, 2, 3, 4, 5), [A]) == [3]
    assert index.match(hs(21, 22, 23), [A]) == [3]


def test_match_several_endpoints_with_different_depths() -> None:
    index = PrefixIndex()
    index.record(A, hs(1, 2, 3, 4))
    index.record(B, hs(1, 2))
    index.record(C, hs(7, 8))
    assert index.match(hs(1, 2, 3, 4, 5), [A, B, C]) == [4, 2, 0]
    assert index.match(hs(1, 2, 3), [C, B, A]) == [0, 2, 3]
    assert index.match(hs(1, 2, 3, 4), [A, A]) == [4, 4]


def test_match_unknown_endpoint_is_zero_and_not_created() -> None:
    index = PrefixIndex()
    index.record(A, hs(1, 2))
    assert index.match(hs(1, 2), ["10.9.9.9:1", A]) == [0, 2]
    assert index.match(hs(1, 2), []) == []
    assert index.stats()["endpoints"] == 1


def test_match_with_many_endpoints() -> None:
    index = PrefixIndex()
    chain = list(range(1000, 1300))
    addresses = [f"10.1.{i // 250}.{i % 250}:8000" for i in range(256)]
    for i, address in enumerate(addresses):
        index.record(address, chain[:i])
    assert index.match(chain, addresses) == list(range(256))


def test_match_sees_endpoints_added_and_removed_between_calls() -> None:
    index = PrefixIndex()
    candidates = [A, B]
    index.record(A, hs(1, 2))
    assert index.match(hs(1, 2), candidates) == [2, 0]
    index.record(B, hs(1))
    assert index.match(hs(1, 2), candidates) == [2, 1]
    index.remove_endpoint(A)
    assert index.match(hs(1, 2), candidates) == [0, 1]
    index.record(C, hs(1, 2))  # reuses A's slot
    index.record(A, hs(1, 2, 3))  # A comes back with a new slot
    assert index.match(hs(1, 2, 3), candidates) == [3, 1]
    assert index.match(hs(1, 2, 3), [C, *candidates]) == [2, 3, 1]


def test_match_does_not_change_lru_order() -> None:
    index = PrefixIndex(default_capacity_blocks=4)
    index.record(A, hs(1, 2))
    index.record(A, hs(3, 4))
    for _ in range(3):
        assert index.match(hs(1, 2), [A]) == [2]
    index.record(A, hs(5, 6))  # evicts the least recently *recorded*: 2, then 1
    assert index.match(hs(1), [A]) == [0]
    assert index.match(hs(3, 4), [A]) == [2]


# -- record / LRU ----------------------------------------------------------------------------------------


def test_lru_evicts_oldest_prompts_tail_first() -> None:
    index = PrefixIndex(default_capacity_blocks=6)
    index.record(A, hs(1, 2, 3))
    index.record(A, hs(4, 5, 6))
    index.record(A, hs(7))  # one over: the oldest prompt loses its last block
    assert index.match(hs(1, 2, 3), [A]) == [2]
    assert index.match(hs(4, 5, 6), [A]) == [3]
    index.record(A, hs(8, 9))
    assert index.match(hs(1, 2, 3), [A]) == [0]
    assert index.entries(A) == 6


def test_record_refreshes_hot_blocks() -> None:
    index = PrefixIndex(default_capacity_blocks=8)
    system = hs(1, 2, 3, 4)
    index.record(A, system)
    for start in range(100, 200, 4):
        index.record(A, system + hs(start, start + 1))  # a shared system prompt with varied suffixes
    assert index.match(system, [A]) == [4]
    assert index.entries(A) == 8


def test_bound_holds_under_many_inserts() -> None:
    index = PrefixIndex(default_capacity_blocks=50)
    index.set_capacity(B, 10)
    rng = random.Random(7)
    for _ in range(500):
        prompt = [rng.getrandbits(64) for _ in range(rng.randint(1, 80))]
        index.record(A, prompt)
        index.record(B, prompt)
        assert index.entries(A) <= 50
        assert index.entries(B) <= 10
    stats = index.stats()
    assert stats["total_entries"] == 60
    assert stats["distinct_blocks"] <= 60


def test_record_longer_than_capacity_keeps_the_head() -> None:
    index = PrefixIndex(default_capacity_blocks=3)
    index.record(A, hs(1, 2, 3, 4, 5))
    assert index.match(hs(1, 2, 3, 4, 5), [A]) == [3]
    assert index.entries(A) == 3


def test_eviction_on_one_endpoint_keeps_the_block_on_others() -> None:
    index = PrefixIndex(default_capacity_blocks=2)
    index.record(A, hs(1, 2))
    index.record(B, hs(1, 2))
    index.record(A, hs(3, 4))
    assert index.match(hs(1, 2), [A, B]) == [0, 2]
    assert index.match(hs(3, 4), [A, B]) == [2, 0]


def test_zero_capacity_records_nothing() -> None:
    index = PrefixIndex(default_capacity_blocks=0)
    index.record(A, hs(1, 2))
    assert index.match(hs(1, 2), [A]) == [0]
    assert index.stats()["total_entries"] == 0


# -- capacity and membership ---------------------------------------------------------------------------


def test_set_capacity_shrink_evicts_least_recent() -> None:
    index = PrefixIndex()
    index.record(A, hs(1, 2))
    index.record(A, hs(3, 4))
    index.set_capacity(A, 3)
    assert index.entries(A) == 3
    assert index.match(hs(1, 2), [A]) == [1]
    index.set_capacity(A, 0)
    assert index.entries(A) == 0
    assert index.match(hs(3, 4), [A]) == [0]
    assert index.stats()["distinct_blocks"] == 0


def test_set_capacity_before_first_record_and_growth() -> None:
    index = PrefixIndex(default_capacity_blocks=1)
    index.set_capacity(A, 2)
    index.record(A, hs(1, 2, 3))
    assert index.entries(A) == 2
    index.set_capacity(A, 10)
    index.record(A, hs(1, 2, 3))
    assert index.match(hs(1, 2, 3), [A]) == [3]
    with pytest.raises(ValueError):
        index.set_capacity(A, -1)


def test_remove_endpoint_forgets_it_and_reuses_its_slot_cleanly() -> None:
    index = PrefixIndex()
    index.record(A, hs(1, 2))
    index.record(B, hs(1, 2))
    index.remove_endpoint(A)
    index.remove_endpoint("10.9.9.9:1")  # unknown: no-op
    assert index.match(hs(1, 2), [A, B]) == [0, 2]
    index.record(C, hs(5))  # takes A's old slot: must not inherit A's blocks
    assert index.match(hs(1, 2), [C, B]) == [0, 2]
    assert index.match(hs(5), [C, B]) == [1, 0]
    index.remove_endpoint(B)
    index.remove_endpoint(C)
    assert index.stats()["total_entries"] == 0
    assert index.stats()["distinct_blocks"] == 0


def test_stats_counts_entries_memory_and_hit_ratio() -> None:
    index = PrefixIndex()
    index.record(A, hs(1, 2, 3))
    index.record(B, hs(1))
    index.match(hs(1, 2, 3, 4), [A, B])  # best candidate holds 3 of 4
    index.match(hs(9, 9), [A, B])  # 0 of 2
    stats = index.stats()
    assert stats["entries_per_endpoint"] == {A: 3, B: 1}
    assert stats["total_entries"] == 4
    assert stats["distinct_blocks"] == 3
    assert stats["capacity_blocks"] == 2 * 31_250
    assert isinstance(stats["memory_bytes_estimate"], int)
    assert stats["memory_bytes_estimate"] > 0
    assert stats["lookups"] == 2
    assert stats["queried_blocks"] == 6
    assert stats["hit_blocks"] == 3
    assert stats["hit_ratio"] == pytest.approx(0.5)
    assert PrefixIndex().stats()["hit_ratio"] == 0.0


class NaiveLRU:
    """Reference model: each endpoint's blocks as a list, least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.blocks: dict[str, list[int]] = {}

    def record(self, address: str, hashes: list[int]) -> None:
        blocks = self.blocks.setdefault(address, [])
        for h in reversed(hashes[: self.capacity]):
            if h in blocks:
                blocks.remove(h)
            blocks.append(h)
        del blocks[: max(0, len(blocks) - self.capacity)]

    def match(self, hashes: list[int], address: str) -> int:
        held = set(self.blocks.get(address, ()))
        depth = 0
        while depth < len(hashes) and hashes[depth] in held:
            depth += 1
        return depth


def test_randomized_operations_agree_with_a_naive_model() -> None:
    rng = random.Random(3)
    index, model = PrefixIndex(default_capacity_blocks=40), NaiveLRU(40)
    addresses = [f"10.0.1.{i}:8000" for i in range(12)]
    roots = [[rng.getrandbits(64) for _ in range(30)] for _ in range(6)]
    for _ in range(400):
        address = rng.choice(addresses)
        prompt = rng.choice(roots)[: rng.randint(1, 30)]
        index.record(address, prompt)
        model.record(address, prompt)
        if rng.random() < 0.05:
            gone = rng.choice(addresses)
            index.remove_endpoint(gone)
            model.blocks.pop(gone, None)
        query = rng.choice(roots)
        assert index.match(query, addresses) == [model.match(query, a) for a in addresses]
    assert index.stats()["total_entries"] == sum(len(b) for b in model.blocks.values())


def test_match_equals_a_naive_walk_over_realistic_chains_with_eviction() -> None:
    import random

    rng = random.Random(5)
    index = PrefixIndex(default_capacity_blocks=40)  # small: constant eviction
    addresses = [f"10.9.0.{i}:8000" for i in range(6)]
    prefixes = ["".join(rng.choice("abcd") for _ in range(64 * rng.randint(1, 12))) for _ in range(8)]

    def prompt() -> str:
        return rng.choice(prefixes) + "".join(rng.choice("wxyz") for _ in range(64 * rng.randint(0, 6)))

    for _ in range(400):
        index.record(rng.choice(addresses), block_hashes(prompt(), seed_model="m"))
        query = block_hashes(prompt(), seed_model="m")
        naive = []
        for address in addresses:
            held = index._endpoints[address].lru if address in index._endpoints else {}
            depth = 0
            while depth < len(query) and query[depth] in held:
                depth += 1
            naive.append(depth)
        assert index.match(query, addresses) == naive
