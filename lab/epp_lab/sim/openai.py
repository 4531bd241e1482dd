"""The OpenAI/vLLM wire shapes of the simulator, without HTTP: request validation, prompt rendering, and the
response documents (completions and chat completions, whole or as stream chunks).

Every client error raises `BadRequest`, which the HTTP layer answers vLLM-style:
`{"object": "error", "message", "type", "param": null, "code"}`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from epp_lab.sim.engine import SimRequest

DEFAULT_MAX_TOKENS = 16


class BadRequest(Exception):
    """A client error answered vLLM-style: `{"object": "error", "message", "type", "code"}`."""

    def __init__(self, message: str, status: int = 400, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(slots=True)
class Generation:
    """A validated /v1/completions or /v1/chat/completions request."""

    chat: bool
    model: str
    texts: list[str]
    """Prompt texts: one per choice (a completions request may send a list of prompts)."""
    max_tokens: int
    stream: bool
    include_usage: bool


def parse_completions(raw: bytes, default_model: str, served: Collection[str]) -> Generation:
    body = _json(raw)
    model = _model(body, default_model, served)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        texts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts = prompt
    else:
        raise BadRequest("'prompt' must be a string or a non-empty list of strings")
    max_tokens = _max_tokens(body, "max_tokens")
    stream, include_usage = _stream_flags(body)
    return Generation(False, model, texts, max_tokens, stream, include_usage)


def parse_chat(raw: bytes, default_model: str, served: Collection[str]) -> Generation:
    body = _json(raw)
    model = _model(body, default_model, served)
    text = chat_prompt(body.get("messages"))
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    stream, include_usage = _stream_flags(body)
    return Generation(True, model, [text], max_tokens, stream, include_usage)


def context_length_error(limit: int, prompt_tokens: int, max_tokens: int) -> BadRequest:
    return BadRequest(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
        f"{max_tokens} in the completion)."
    )


def _json(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest(f"the simulator supports n=1 only (got n={n!r})")
    return body


def _model(body: dict[str, Any], default: str, served: Collection[str]) -> str:
    model = body.get("model", default)
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    if model not in served:
        raise BadRequest(f"The model `{model}` does not exist.", 404, "NotFoundError")
    return model


def _max_tokens(body: dict[str, Any], *keys: str) -> int:
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            raise BadRequest(f"{key} must be a positive integer (got {value!r})")
        return value
    return DEFAULT_MAX_TOKENS


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object")
    return stream, bool(options.get("include_usage", False))


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest("each content part must be an object with a 'type'")
            if part["type"] == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise BadRequest("a text content part needs a string 'text'")
                parts.append(text)
            else:
                parts.append(f"<{part['type']}>")  # images etc.: a placeholder keeps the prefix stable
        return "\n".join(parts)
    raise BadRequest("message content must be a string or a list of content parts")


def chat_prompt(messages: Any) -> str:
    """Serialize chat messages to the prompt text, Llama-3-template style.

    Each message is a self-delimited segment, so the text of a conversation is a prefix of the text of its
    continuation (multi-turn requests hit the prefix cache), as with real chat templates.
    """
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    out = ["<|begin_of_text|>"]
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest("each message must be an object with a string 'role'")
        out.append(
            f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{_content_text(m.get('content'))}<|eot_id|>"
        )
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


# ---- response documents ------------------------------------------------------------------------------


def usage(reqs: Sequence[SimRequest]) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for r in reqs)
    completion = sum(r.generated for r in reqs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in reqs)},
    }


def choice(chat: bool, index: int, text: str) -> dict[str, Any]:
    """One choice of a whole (non-streamed) response; the simulator always stops on length."""
    if chat:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "length",
        }
    return {"index": index, "text": text, "logprobs": None, "finish_reason": "length", "stop_reason": None}


def response(
    rid: str, chat: bool, created: int, model: str, reqs: Sequence[SimRequest], texts: list[str]
) -> dict[str, Any]:
    """The whole response document of a non-streamed request."""
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": [choice(chat, i, text) for i, text in enumerate(texts)],
        "usage": usage(reqs),
    }


def chunk_choice(chat: bool, index: int, text: str, first: bool, finish: str | None) -> dict[str, Any]:
    """One choice of a stream chunk; a chat stream's first delta carries the role."""
    if chat:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}


def chunk_object(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"
