"""OpenAI body parsing: the fields routing needs, the prompt text for prefix matching, and 400s."""

from __future__ import annotations

import orjson
import pytest

from epp.errors import Rejection
from epp.requestcontrol.parsing import parse_request


def parse(body: dict, path: str = "/v1/chat/completions"):
    return parse_request(orjson.dumps(body), path)


def test_chat_with_string_and_part_list_content() -> None:
    parsed = parse(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
                },
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_completion_tokens": 64,
            "cache_salt": "tenant-a",
            "user": "u1",
        }
    )
    assert parsed.prompt == "<|system|>be brief<|user|>hi there"
    assert parsed.stream and parsed.include_usage
    assert (parsed.max_tokens, parsed.cache_salt, parsed.user) == (64, "tenant-a", "u1")
    assert parsed.prompt_tokens == -(-len(parsed.prompt) // 4)


def test_earlier_turns_are_a_prefix_of_later_turns() -> None:
    turn1 = [{"role": "user", "content": "q1"}]
    turn2 = [*turn1, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert parse({"model": "m", "messages": turn2}).prompt.startswith(
        parse({"model": "m", "messages": turn1}).prompt
    )


def test_image_parts_identify_the_prompt_without_failing() -> None:
    parsed = parse({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]})  # fmt: skip
    assert "cat.png" in parsed.prompt


@pytest.mark.parametrize(
    ("prompt", "text", "tokens"),
    [
        ("abcdefgh", "abcdefgh", 2),
        (["ab", "cd"], "ab\ncd", 2),
        ([1, 2, 3], "1,2,3", 3),
        ([[1, 2], [3]], "1,2|3", 3),
    ],
)
def test_completions_prompt_shapes(prompt, text, tokens) -> None:
    parsed = parse({"model": "m", "prompt": prompt, "max_tokens": 5}, "/v1/completions")
    assert (parsed.prompt, parsed.prompt_tokens, parsed.max_tokens) == (text, tokens, 5)


def test_embeddings_and_responses() -> None:
    assert parse({"model": "e", "input": "hello"}, "/v1/embeddings").prompt == "hello"
    parsed = parse(
        {
            "model": "m",
            "instructions": "sys",
            "input": [{"role": "user", "content": "q"}],
            "max_output_tokens": 9,
        },
        "/v1/responses",
    )
    assert parsed.prompt == "sys<|user|>q" and parsed.max_tokens == 9


@pytest.mark.parametrize(
    ("body", "path", "code", "fragment"),
    [
        (b"", "/v1/completions", "bad_request", "not valid JSON"),
        (b'"str"', "/v1/completions", "bad_request", "must be a JSON object"),
        (b'{"prompt": "x"}', "/v1/completions", "model_required", "'model' is required"),
        (b'{"model": 3, "prompt": "x"}', "/v1/completions", "model_required", "must be a string"),
        (b'{"model": "m"}', "/v1/completions", "bad_request", "'prompt' is required"),
        (b'{"model": "m", "messages": []}', "/v1/chat/completions", "bad_request", "non-empty list"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "/v1/chat/completions", "bad_request", "'role'"),
        (
            b'{"model": "m", "messages": [{"role": "u", "content": 5}]}',
            "/v1/chat/completions",
            "bad_request",
            "content",
        ),
        (b'{"model": "m", "prompt": "x", "max_tokens": -1}', "/v1/completions", "bad_request", "max_tokens"),
        (
            b'{"model": "m", "prompt": "x", "stream_options": 1}',
            "/v1/completions",
            "bad_request",
            "stream_options",
        ),
        (b'{"model": "m", "input": {}}', "/v1/embeddings", "bad_request", "'input'"),
    ],
)
def test_bad_bodies_are_400_with_a_reason(body, path, code, fragment) -> None:
    with pytest.raises(Rejection) as err:
        parse_request(body, path)
    assert err.value.status == 400 and err.value.code == code and fragment in err.value.message
