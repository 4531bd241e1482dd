"""The request parser under hostile input: every body either parses into sane values or is refused with the
parser's clean 400 (`Rejection`), never anything else (a 500 from a bug)."""

from __future__ import annotations

import orjson
import pytest
from fuzz.strategies import INFERENCE_PATHS, RAW_BODIES, examples, textual_attacks, valid_request, wrong_types
from hypothesis import example, given, settings
from hypothesis import strategies as st

from epp.errors import Rejection
from epp.requestcontrol.parsing import MAX_JSON_DEPTH, ParsedRequest, parse_request

CODES = {"bad_request", "model_required"}


def check(raw: bytes, path: str) -> ParsedRequest | Rejection:
    """The property: a parse with sane results, or a 4xx Rejection with a message; nothing else escapes."""
    try:
        parsed = parse_request(raw, path)
    except Rejection as rejection:
        assert 400 <= rejection.status < 500 and rejection.code in CODES, rejection
        assert rejection.message and orjson.loads(rejection.body())["error"]["code"] == rejection.code
        return rejection
    assert isinstance(parsed.model, str) and parsed.model
    assert isinstance(parsed.prompt, str)
    parsed.prompt.encode("utf-8")  # the prefix index hashes it: never a lone surrogate
    assert isinstance(parsed.prompt_tokens, int) and parsed.prompt_tokens >= 0
    assert isinstance(parsed.max_tokens, int) and parsed.max_tokens >= 0
    assert isinstance(parsed.stream, bool) and isinstance(parsed.include_usage, bool)
    assert isinstance(parsed.cache_salt, str) and isinstance(parsed.user, str)
    # A rewritten model re-encodes the body (director): whatever parsed must encode again.
    orjson.dumps({**parsed.body, "model": "rewritten"})
    return parsed


@settings(max_examples=examples(600))
@given(RAW_BODIES)
def test_any_body_parses_or_is_a_clean_400(case: tuple[str, bytes]) -> None:
    check(case[1], case[0])


@settings(max_examples=examples(300))
@given(valid_request())
def test_well_formed_requests_parse(case: tuple[str, dict]) -> None:
    path, body = case
    assert isinstance(check(orjson.dumps(body), path), ParsedRequest)


@settings(max_examples=examples(400))
@given(wrong_types())
def test_a_field_of_the_wrong_type_anywhere_is_parsed_or_a_400(case: tuple[str, bytes]) -> None:
    check(case[1], case[0])


@settings(max_examples=examples(400))
@given(textual_attacks())
def test_byte_level_damage_is_parsed_or_a_400(case: tuple[str, bytes]) -> None:
    check(case[1], case[0])


@pytest.mark.parametrize("path", INFERENCE_PATHS)
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 1025, 100_000])
@pytest.mark.parametrize("kind", ["list", "object", "part"])
def test_nesting_is_accepted_up_to_the_limit_and_a_400_beyond(path: str, depth: int, kind: str) -> None:
    """Found by these tests: an image part nested deeper than orjson's encoder limit (254) crashed the
    parser (500), and any such body crashed a model rewrite (re-encoding). Now the depth limit is one rule
    for every body: up to MAX_JSON_DEPTH levels (the document itself is level 1) parse, deeper is a 400."""
    # Levels: the body object is 1, a top-level field's value 2; a content part's field value is at 6.
    rest = '"prompt":"p","input":"i"'
    if kind == "part":
        nested = "[" * (depth - 5) + "]" * (depth - 5)
        raw = '{"model":"m","messages":[{"role":"u","content":[{"type":"image_url","x":%s}]}],%s}'
    else:
        k = depth - 1
        nested = "[" * k + "]" * k if kind == "list" else '{"a":' * k + "1" + "}" * k
        raw = '{"model":"m","messages":[{"role":"u","content":"c"}],"x":%s,%s}'
    raw = raw % (nested, rest)
    result = check(raw.encode(), path)
    if depth <= MAX_JSON_DEPTH:
        assert isinstance(result, ParsedRequest), result
    else:
        assert isinstance(result, Rejection) and "nest" in result.message, result


@settings(max_examples=examples(100))
@given(st.binary(max_size=64), st.sampled_from(INFERENCE_PATHS))
@example(b"", "/v1/chat/completions")
@example(b"\xff\xfe", "/v1/completions")
def test_random_bytes_on_inference_paths(raw: bytes, path: str) -> None:
    check(raw, path)
