"""The simulator's OpenAI shapes without HTTP: request validation and chat prompt rendering."""

from __future__ import annotations

import pytest

from epp_lab.sim.config import DEFAULT_MODEL
from epp_lab.sim.openai import DEFAULT_MAX_TOKENS, BadRequest, chat_prompt, parse_chat, parse_completions

SERVED = frozenset({DEFAULT_MODEL, "sql"})


def test_chat_prompt_of_a_conversation_prefixes_its_continuation() -> None:
    turn1 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    one, two = chat_prompt(turn1), chat_prompt(turn2)
    assert two.startswith(one.removesuffix("<|start_header_id|>assistant<|end_header_id|>\n\n"))
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]
    assert "look\n<image_url>" in chat_prompt([{"role": "user", "content": parts}])


def test_requests_parse_with_vllm_defaults() -> None:
    gen = parse_completions(b'{"prompt": ["a", "b"], "stream": true}', DEFAULT_MODEL, SERVED)
    assert (gen.chat, gen.model, gen.texts, gen.max_tokens) == (False, DEFAULT_MODEL, ["a", "b"], 16)
    assert (gen.stream, gen.include_usage) == (True, False)
    body = (
        b'{"model": "sql", "messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 3,'
        b' "max_tokens": 9, "stream_options": {"include_usage": true}}'
    )
    gen = parse_chat(body, DEFAULT_MODEL, SERVED)
    assert (gen.chat, gen.model, gen.max_tokens, gen.include_usage) == (True, "sql", 3, True)
    assert DEFAULT_MAX_TOKENS == 16


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b'{"prompt": "x", "n": 2}', 400, "n=1 only"),
        (b'{"prompt": "x", "max_tokens": 0}', 400, "positive integer"),
        (b'{"prompt": "x", "stream_options": 5}', 400, "'stream_options' must be an object"),
        (b'{"model": 3, "prompt": "x"}', 400, "'model' must be a string"),
        (b'{"model": "gpt-9", "prompt": "x"}', 404, "does not exist"),
    ],
)
def test_bad_requests_say_what_is_wrong(body: bytes, status: int, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as err:
        parse_completions(body, DEFAULT_MODEL, SERVED)
    assert err.value.status == status
