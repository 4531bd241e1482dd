"""Hypothesis strategies for hostile and malformed OpenAI request bodies (shared by the fuzz tests)."""

from __future__ import annotations

import os
from typing import Any

import orjson
from hypothesis import strategies as st

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"


def examples(ci: int) -> int:
    """`ci` examples in CI, 50x as many with HYPOTHESIS_PROFILE=long."""
    return ci * 50 if LONG else ci


CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
)
INFERENCE_PATHS = (CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES)
PATHS = st.sampled_from(
    [*INFERENCE_PATHS, "/v1/models", "", "/", "/v1/chat/completions?x=1", "/v1/completions/", "/other"]
) | st.text(max_size=40)

# JSON scalars, including the awkward ones: 64-bit edges, floats near the limits, control characters and
# non-BMP text, empty strings.
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
    | st.sampled_from(["", "\x00", "\u2028", "\U0001f600", "model", "user", "text", "image_url"])
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

ROLES = st.sampled_from(["user", "system", "assistant", "tool", "developer"]) | st.text(max_size=8)
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})
IMAGE_PART = st.fixed_dictionaries(
    {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.text(max_size=20)})}
)
CONTENT = st.text(max_size=40) | st.lists(TEXT_PART | IMAGE_PART | st.text(max_size=10), max_size=3)
MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": CONTENT})
TOKEN_IDS = st.lists(st.integers(min_value=0, max_value=200_000), min_size=1, max_size=8)
PROMPT = (
    st.text(max_size=60)
    | st.lists(st.text(max_size=20), min_size=1, max_size=3)
    | TOKEN_IDS
    | st.lists(TOKEN_IDS, min_size=1, max_size=3)
)
COMMON_FIELDS: dict[str, Any] = {
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "max_tokens": st.integers(min_value=0, max_value=100_000),
    "max_completion_tokens": st.integers(min_value=0, max_value=100_000),
    "cache_salt": st.text(max_size=10),
    "user": st.text(max_size=10),
    "temperature": st.floats(min_value=0, max_value=2),
}
MODEL = st.sampled_from(["m", "llama", "adapter-1"]) | st.text(min_size=1, max_size=20)


def _body(path: str, required: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"model": MODEL, **required}, optional=COMMON_FIELDS)


VALID_BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    CHAT: _body(CHAT, {"messages": st.lists(MESSAGE, min_size=1, max_size=4)}),
    COMPLETIONS: _body(COMPLETIONS, {"prompt": PROMPT}),
    EMBEDDINGS: _body(EMBEDDINGS, {"input": PROMPT}),
    RESPONSES: _body(
        RESPONSES,
        {"input": st.text(max_size=40) | st.lists(MESSAGE | st.text(max_size=10), max_size=3)},
    ),
}


@st.composite
def valid_request(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(path, body) of a well-formed request to one of the four inference paths."""
    path = draw(st.sampled_from(INFERENCE_PATHS))
    return path, draw(VALID_BODIES[path])


def _paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path inside a decoded JSON value (to pick one field to break)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out += _paths_of(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            out += _paths_of(child, (*prefix, index))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any, delete: bool) -> None:
    for key in path[:-1]:
        value = value[key]
    if delete:
        del value[path[-1]]
    else:
        value[path[-1]] = new


@st.composite
def wrong_types(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid request with one field anywhere in it (top level or nested) replaced by a random JSON value
    of any type, or removed."""
    path, body = draw(valid_request())
    field_path = draw(st.sampled_from(_paths_of(body)))
    _replace(body, field_path, draw(JSON), draw(st.booleans()))
    return path, orjson.dumps(body)


def _nest(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


@st.composite
def textual_attacks(draw: st.DrawFn) -> tuple[str, bytes]:
    """Byte-level damage to a valid body: things a JSON encoder never produces."""
    path, body = draw(valid_request())
    raw = orjson.dumps(body).decode()
    attack = draw(
        st.sampled_from(
            ["nest", "duplicate", "literal", "number", "utf8", "truncate", "huge", "wrap", "bom", "nul"]
        )
    )
    if attack == "nest":  # deep nesting somewhere: inside an extra field, or as the content of a part
        depth = draw(st.sampled_from([1, 100, 253, 254, 255, 256, 300, 1023, 1024, 1025, 5000]))
        nested = _nest(depth, draw(st.sampled_from(["list", "dict"])))
        where = draw(st.sampled_from(["extra", "part", "prompt"]))
        if where == "part" and path == CHAT:
            body["messages"][0]["content"] = [{"type": "image_url", "image_url": "@"}]
            raw = orjson.dumps(body).decode().replace('"@"', nested, 1)
        elif where == "prompt":
            raw = '{"model":"m","prompt":' + nested + ',"input":' + nested + "}"
        else:
            raw = raw[:-1] + ',"extra":' + nested + "}"
    elif attack == "duplicate":  # duplicate keys: the last one wins, whatever its type
        key = draw(st.sampled_from(["model", "messages", "prompt", "input", "stream", "max_tokens"]))
        value = orjson.dumps(draw(JSON)).decode()
        raw = raw[:-1] + f',"{key}":{value}' + "}"
    elif attack == "literal":  # NaN, Infinity and friends are not JSON
        literal = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "nan", "inf", "undefined", "None"]))
        raw = raw[:-1] + f',"max_tokens":{literal}' + "}"
    elif attack == "number":  # huge and odd numbers
        number = draw(
            st.sampled_from(
                ["1e400", "-1e400", "1" * 400, "-" + "9" * 40, "18446744073709551616", "1e-400", "0.0e0",
                 "-0", "1E+2", "00", "1.", ".5", "0x10"]
            )
        )  # fmt: skip
        key = draw(st.sampled_from(["max_tokens", "max_completion_tokens", "prompt", "model", "stream"]))
        raw = raw[:-1] + f',"{key}":{number}' + "}"
    elif attack == "utf8":  # invalid UTF-8 and escaped lone surrogates inside a string
        junk = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf"]))
        data = orjson.dumps(body)
        at = data.find(b'"', data.find(b":")) + 1
        return path, data[:at] + junk + data[at:]
    elif attack == "truncate":
        data = orjson.dumps(body)
        return path, data[: draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))]
    elif attack == "huge":  # a huge string or a long list in a field (sizes that still run fast)
        size = draw(st.sampled_from([1 << 16, 1 << 20]))
        if draw(st.booleans()):
            body["model"] = "m" * size
        else:
            body["prompt" if path == COMPLETIONS else "user"] = [0] * (size // 16)
        raw = orjson.dumps(body).decode()
    elif attack == "wrap":  # a valid body inside something that is not an object
        raw = draw(st.sampled_from(["[{}]", '"{}"', "{}{}", "{} x", " {} ", "null"])).replace("{}", raw)
    elif attack == "bom":
        return path, b"\xef\xbb\xbf" + raw.encode()
    else:  # a NUL byte or control character outside strings
        raw = raw[:1] + draw(st.sampled_from(["\x00", "\x01", "\x1f", "\x7f"])) + raw[1:]
    return path, raw.encode("utf-8", "surrogatepass")


RAW_BODIES = (
    st.tuples(PATHS, st.binary(max_size=200))
    | st.tuples(PATHS, JSON.map(orjson.dumps))
    | st.tuples(PATHS, valid_request().map(lambda pb: orjson.dumps(pb[1])))
    | wrong_types()
    | textual_attacks()
)
"""(path, raw body) of every kind: random bytes, random JSON, valid bodies on any path, a field of the wrong
type, byte-level damage."""
