"""Parse an OpenAI-API request body once into what routing and scheduling need.

Supported paths: /v1/completions, /v1/chat/completions, /v1/embeddings, /v1/responses (any other path is
parsed generically: it needs a `model`). The prompt text used for prefix matching is the prompt itself
(completions), the serialized messages ("<|role|>content" per message, in order, so a conversation's
earlier turns are a prefix of its later ones), the embedding input, or the responses `instructions` +
`input`. Token estimate = ceil(characters / 4), or the length of a token-id prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from epp.config import CHARS_PER_TOKEN
from epp.errors import Rejection, bad_request

# Deepest JSON nesting accepted (the body itself is level 1): orjson encodes at most 254 levels, and a body
# the picker accepts must re-encode (a model rewrite; an image part's reference). Deeper is a 400.
MAX_JSON_DEPTH = 254


@dataclass(slots=True)
class ParsedRequest:
    body: dict[str, Any]  # the decoded JSON (kept to re-encode if the model is rewritten)
    model: str
    prompt: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    cache_salt: str
    user: str


def _text_of_content(content: Any, where: str) -> str:
    """Message content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for index, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                elif part.get("type") in (None, "text", "input_text", "output_text"):
                    raise bad_request(f"{where}.content[{index}]: a text part needs a string 'text'")
                else:
                    # Images, audio, files: identify them by their reference so equal prompts match.
                    parts.append(orjson.dumps(part).decode())
            else:
                raise bad_request(f"{where}.content[{index}]: must be an object or a string")
        return "".join(parts)
    raise bad_request(f"{where}.content: must be a string or a list of content parts")


def _chat_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list")
    chunks: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad_request(f"messages[{index}]: must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise bad_request(f"messages[{index}]: 'role' must be a string")
        chunks.append(f"<|{role}|>")
        chunks.append(_text_of_content(message.get("content"), f"messages[{index}]"))
    return "".join(chunks)


def _prompt_text(prompt: Any, field: str) -> tuple[str, int]:
    """(text, token estimate) of a completions prompt or an embeddings input."""
    if isinstance(prompt, str):
        return prompt, -(-len(prompt) // CHARS_PER_TOKEN)
    if isinstance(prompt, list):
        if not prompt:
            raise bad_request(f"'{field}' must not be empty")
        if all(isinstance(p, str) for p in prompt):
            text = "\n".join(prompt)
            return text, -(-len(text) // CHARS_PER_TOKEN)
        if all(isinstance(p, int) for p in prompt):
            # Token ids: the ids themselves identify the prefix; the count is exact.
            return ",".join(map(str, prompt)), len(prompt)
        if all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return "|".join(",".join(map(str, p)) for p in prompt), sum(len(p) for p in prompt)
    raise bad_request(f"'{field}' must be a string, a list of strings, or token ids")


def _responses_text(body: dict[str, Any]) -> str:
    instructions = body.get("instructions")
    text = instructions if isinstance(instructions, str) else ""
    items = body.get("input")
    if isinstance(items, str):
        return text + items
    if isinstance(items, list):
        chunks = [text]
        for index, item in enumerate(items):
            if isinstance(item, dict):
                role = item.get("role")
                if isinstance(role, str):
                    chunks.append(f"<|{role}|>")
                chunks.append(_text_of_content(item.get("content"), f"input[{index}]"))
            elif isinstance(item, str):
                chunks.append(item)
        return "".join(chunks)
    if items is None:
        return text
    raise bad_request("'input' must be a string or a list of items")


def _int_field(body: dict[str, Any], *names: str) -> int:
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad_request(f"'{name}' must be a non-negative integer")
        return value
    return 0


# Path suffixes of the OpenAI inference APIs the parser knows (any prefix: /v1/..., /openai/v1/...).
INFERENCE_ROUTES = ("/chat/completions", "/completions", "/embeddings", "/responses")


def _route(path: str) -> str:
    """The path without its query string and trailing slashes."""
    return path.split("?", 1)[0].rstrip("/")


def is_inference_path(path: str) -> bool:
    """True for the OpenAI inference paths (their POSTs must carry a JSON body with a `model`)."""
    return _route(path).endswith(INFERENCE_ROUTES)


def check_bodyless(method: str, path: str) -> None:
    """A request without a body (or with a zero-length one). A POST to an inference path is a 400: it has
    nothing to infer from, and a model server would only refuse it later (after the picker counted it in
    flight there). Every other body-less request (GET /v1/models, health checks) is routed on load alone."""
    if method == "POST" and is_inference_path(path):
        raise bad_request(f"request body is empty: POST {_route(path)} needs a JSON body with a 'model'")


def _too_deep(value: Any) -> bool:
    """True if `value` nests deeper than MAX_JSON_DEPTH (iterative: no recursion on hostile input)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values() if isinstance(child, dict | list))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item if isinstance(child, dict | list))
    return False


def parse_request(raw: bytes, path: str) -> ParsedRequest:
    """Decode and validate the body. Raises `Rejection` (400) with the reason on bad input."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        if str(err).startswith("depth limit exceeded"):  # orjson's own limit (1024 levels)
            raise bad_request(f"request body is nested more than {MAX_JSON_DEPTH} levels deep") from None
        raise bad_request(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    # Cheap test first: a body with fewer brackets than the limit cannot nest that deep.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _too_deep(body):
        raise bad_request(f"request body is nested more than {MAX_JSON_DEPTH} levels deep")
    model = body.get("model")
    if model is None or model == "":
        raise bad_request("'model' is required", code="model_required")
    if not isinstance(model, str):
        raise bad_request("'model' must be a string", code="model_required")

    route = _route(path)
    if route.endswith("/chat/completions"):
        prompt = _chat_text(body.get("messages"))
        tokens = -(-len(prompt) // CHARS_PER_TOKEN)
    elif route.endswith("/completions"):
        if "prompt" not in body:
            raise bad_request("'prompt' is required")
        prompt, tokens = _prompt_text(body["prompt"], "prompt")
    elif route.endswith("/embeddings"):
        if "input" not in body:
            raise bad_request("'input' is required")
        prompt, tokens = _prompt_text(body["input"], "input")
    elif route.endswith("/responses"):
        prompt = _responses_text(body)
        tokens = -(-len(prompt) // CHARS_PER_TOKEN)
    else:
        prompt, tokens = "", 0

    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object")
    cache_salt = body.get("cache_salt", "")
    if not isinstance(cache_salt, str):
        raise bad_request("'cache_salt' must be a string")
    user = body.get("user", "")
    return ParsedRequest(
        body=body,
        model=model,
        prompt=prompt,
        prompt_tokens=tokens,
        max_tokens=_int_field(body, "max_completion_tokens", "max_tokens", "max_output_tokens"),
        stream=stream,
        include_usage=bool(options and options.get("include_usage")),
        cache_salt=cache_salt,
        user=user if isinstance(user, str) else "",
    )


__all__ = [
    "INFERENCE_ROUTES",
    "MAX_JSON_DEPTH",
    "ParsedRequest",
    "Rejection",
    "check_bodyless",
    "is_inference_path",
    "parse_request",
]
