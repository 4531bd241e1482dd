"""Prompt -> token ids, as the engine tokenizes it (for the precise prefix-cache scorer).

The scorer runs on the request path, so tokenizing is local and synchronous (no call to the engine's
`/tokenize`: a network round trip per request, and a dependency on the very replica being chosen). Two
tokenizers:

* `HfTokenizer(path)`: the model's own tokenizer from a local folder (`tokenizer.json`, read by the Rust
  `tokenizers` library; `tokenizer_config.json` for the special tokens; the chat template from
  `chat_template.jinja` or `tokenizer_config.json`'s `chat_template`, rendered with jinja2 in a sandbox).
  As vLLM does: a completions string prompt is encoded with special tokens (the tokenizer's post-processor
  adds BOS); a chat request is rendered with `add_generation_prompt=True` and encoded without special
  tokens (the template writes them); a completions prompt of token ids is used as is.
* `SimTokenizer()`: the simulator's scheme (`epp_lab.sim`): token k of a text is its characters
  [4k, 4k+4) (the last may be shorter), id = xxh32 of their UTF-8 bytes; chat is rendered with the
  simulator's Llama-3-style template (`SIM_CHAT_TEMPLATE`).

Cost: the Rust tokenizer takes ~1-3 µs per token on this machine (a 6k-token prompt: several ms), too much
to pay again for every request that shares a long prefix. So a text is cut into chunks of ~`CHUNK_CHARS`
characters at content-defined places (the first space after every `CHUNK_CHARS`th character that sits
between two non-space characters, where byte-level BPE pre-tokenizers always split: " word" starts a new
pre-token), each chunk is tokenized on its own and remembered in an LRU of `CACHE_CHUNKS` chunks, and the
ids are concatenated. Shared prefixes cut at the same places, so a request pays only for its new text.
That is exact only for tokenizers whose pre-tokenizer splits there (ByteLevel, as Llama 3, Qwen, GPT-2);
`HfTokenizer` checks it at load time on sample texts and tokenizes whole texts otherwise. Tokenizing stops
after `limit` tokens (the scorer asks for max_blocks x block size).

The picker sees a chat request as its serialized messages (`SchedulingRequest.prompt` = "<|role|>content"
per message, see `epp.requestcontrol.parsing`); `split_messages` turns that back into messages. Content
that itself contains "<|role|>" with a known role would be split wrongly (the prediction then misses;
routing still works through the other scorers).
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from xxhash import xxh32_intdigest

from epp.config import CHARS_PER_TOKEN, ConfigError

CHUNK_CHARS = 1024  # characters per cached tokenization chunk (about 250 tokens)
CACHE_CHUNKS = 4096  # chunks remembered (~4 MB of text and ~1M ids at most)
_SELF_CHECK = (
    "def f(x):\n    return x  # ok\n\n\n  indented   words\tand tabs, numbers 12345 and ünïcödé text. " * 40,
    "The quick brown fox jumps over the lazy dog; " * 80 + "trailing   spaces   ",
)
ROLES = ("system", "user", "assistant", "tool", "developer", "function")
_ROLE_MARK = re.compile(r"<\|(" + "|".join(ROLES) + r")\|>")
_TOKEN_IDS = re.compile(r"\d+(?:,\d+)*")

SIM_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
"""The simulator's chat rendering (`epp_lab.sim.openai.chat_prompt`) as a template."""


def split_messages(serialized: str) -> list[dict[str, str]]:
    """ "<|user|>hi<|assistant|>hello" -> [{"role": "user", "content": "hi"}, ...]; [] if not of that form."""
    parts = _ROLE_MARK.split(serialized)
    if len(parts) < 3 or parts[0]:
        return []
    return [{"role": parts[i], "content": parts[i + 1]} for i in range(1, len(parts) - 1, 2)]


def token_id_prompt(prompt: str, prompt_tokens: int) -> list[int] | None:
    """A completions prompt given as token ids (the parser writes them as "1,2,3" and counts them exactly);
    None for a text prompt."""
    if not prompt or not _TOKEN_IDS.fullmatch(prompt):
        return None
    ids = [int(t) for t in prompt.split(",")]
    return ids if len(ids) == prompt_tokens else None


class Tokenizer(Protocol):
    def encode_text(self, text: str, limit: int | None = None) -> list[int]:
        """A completions prompt, as the engine encodes it (at least its first `limit` tokens)."""
        ...

    def encode_chat(self, messages: Sequence[dict[str, str]], limit: int | None = None) -> list[int]:
        """Chat messages rendered with the model's template (generation prompt added), then encoded."""
        ...


def split_points(text: str, every: int = CHUNK_CHARS) -> list[int]:
    """Where to cut `text` (see the module docstring): after every `every` characters, the first space
    with a non-space character on both sides."""
    points: list[int] = []
    start = every
    n = len(text)
    while start < n:
        i = text.find(" ", start)
        while i != -1 and (i + 1 >= n or text[i - 1].isspace() or text[i + 1].isspace()):
            i = text.find(" ", i + 1)
        if i == -1:
            break
        points.append(i)
        start = i + every
    return points


def _render(template: Any, messages: Sequence[dict[str, str]], specials: dict[str, str]) -> str:
    return str(template.render(messages=list(messages), add_generation_prompt=True, **specials))


def _compile(source: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )  # as transformers renders chat templates
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _special(config: dict[str, Any], name: str) -> str:
    value = config.get(name)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class HfTokenizer:
    """The model's tokenizer from a local folder (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise ConfigError(
                "plugin 'precise-prefix-cache': install the 'precise' extra (pip install 'epp[precise]')"
            ) from None
        folder = Path(path)
        file = folder if folder.is_file() else folder / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"plugin 'precise-prefix-cache': no tokenizer.json at {path}")
        folder = file.parent
        self._tok = RustTokenizer.from_file(str(file))
        config: dict[str, Any] = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        template = None
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        self._template = _compile(template) if template else None
        self._specials = {name: _special(config, name) for name in ("bos_token", "eos_token")}
        self._cache: OrderedDict[tuple[str, bool], list[int]] = OrderedDict()
        self.chunked = all(
            self._chunked(t, special, None) == self._whole(t, special)
            for t in _SELF_CHECK
            for special in (True, False)
        )
        self._cache.clear()

    def _whole(self, text: str, special: bool) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=special).ids)

    def _chunked(self, text: str, special: bool, limit: int | None) -> list[int]:
        cache = self._cache
        out: list[int] = []
        start = 0
        for end in [*split_points(text), len(text)]:
            key = (text[start:end], special and start == 0)
            ids = cache.get(key)
            if ids is None:
                ids = cache[key] = self._whole(*key)
                if len(cache) > CACHE_CHUNKS:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(key)
            out += ids
            start = end
            if limit is not None and len(out) >= limit:
                break
        return out

    def encode(self, text: str, special: bool, limit: int | None = None) -> list[int]:
        return self._chunked(text, special, limit) if self.chunked else self._whole(text, special)

    def encode_text(self, text: str, limit: int | None = None) -> list[int]:
        return self.encode(text, True, limit)

    def encode_chat(self, messages: Sequence[dict[str, str]], limit: int | None = None) -> list[int]:
        if self._template is None:
            raise ValueError("the tokenizer has no chat template")
        return self.encode(_render(self._template, messages, self._specials), False, limit)


def sim_token_ids(text: str) -> list[int]:
    """The simulator's token ids of `text`: xxh32 of each 4-character piece (see the module docstring)."""
    step = CHARS_PER_TOKEN
    return [
        xxh32_intdigest(text[i : i + step].encode("utf-8", "surrogatepass"))
        for i in range(0, len(text), step)
    ]


class SimTokenizer:
    """The simulator's tokenizer (see the module docstring)."""

    def __init__(self) -> None:
        self._template: Any = None

    def encode_text(self, text: str, limit: int | None = None) -> list[int]:
        return sim_token_ids(text if limit is None else text[: limit * CHARS_PER_TOKEN])

    def encode_chat(self, messages: Sequence[dict[str, str]], limit: int | None = None) -> list[int]:
        if self._template is None:
            self._template = _compile(SIM_CHAT_TEMPLATE)
        return self.encode_text(_render(self._template, messages, {}), limit)


def load_tokenizer(spec: str) -> Tokenizer:
    """ "simulator" or a local path (folder with tokenizer.json, or the file itself)."""
    if spec == "simulator":
        return SimTokenizer()
    return HfTokenizer(spec)
