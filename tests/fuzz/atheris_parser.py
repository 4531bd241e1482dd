"""Coverage-guided fuzzing of the request parser (atheris, i.e. libFuzzer over CPython's bytecode): a command,
not part of CI (CI runs `check` on the seeds only, tests/fuzz/test_atheris_harness.py).

    .venv/bin/python tests/fuzz/atheris_parser.py -max_total_time=600            # 10 minutes
    .venv/bin/python tests/fuzz/atheris_parser.py -runs=200000 -jobs=2 out/fuzz  # keep a corpus

The first byte of an input picks the path, the rest is the body. Any exception but the parser's own 4xx
`Rejection`, or a parse whose result cannot be re-encoded (what a model rewrite does), is a crash: libFuzzer
stops and writes the input to `crash-<sha1>`; replay it with `python tests/fuzz/atheris_parser.py crash-...`.
Without a corpus directory the seeds below start the run (a JSON dictionary guides mutations).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "")
SEEDS = (
    b'\x00{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true}',
    b'\x00{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},'
    b' {"type": "image_url", "image_url": {"url": "u"}}]}], "max_completion_tokens": 5}',
    b'\x01{"model": "m", "prompt": ["a", "b"], "max_tokens": 3, "cache_salt": "s"}',
    b'\x01{"model": "m", "prompt": [[1, 2], [3]]}',
    b'\x02{"model": "m", "input": [1, 2, 3], "user": "u"}',
    b'\x03{"model": "m", "instructions": "be brief", "input": [{"role": "user", "content": "x"}, "y"]}',
    b'\x04{"model": "m", "stream_options": {"include_usage": true}}',
)
DICTIONARY = (
    '"model"', '"messages"', '"role"', '"content"', '"type"', '"text"', '"image_url"', '"prompt"', '"input"',
    '"instructions"', '"stream"', '"stream_options"', '"include_usage"', '"max_tokens"',
    '"max_completion_tokens"', '"max_output_tokens"', '"cache_salt"', '"user"', "true", "false", "null",
    "[", "]", "{", "}", ":", ",", '"', "\\u0000", "\\ud800", "1e308", "-0", "18446744073709551615",
)  # fmt: skip


def check(data: bytes) -> None:
    """One input: parsed (and re-encodable), or the parser's clean 4xx; anything else raises."""
    import orjson

    from epp.errors import Rejection
    from epp.requestcontrol.parsing import parse_request

    path = PATHS[data[0] % len(PATHS)] if data else PATHS[0]
    try:
        parsed = parse_request(data[1:], path)
    except Rejection as rejection:
        if not 400 <= rejection.status < 500 or not rejection.message:
            raise AssertionError(f"not a clean 4xx: {rejection.status} {rejection.message!r}") from None
        return
    orjson.dumps({**parsed.body, "model": "rewritten"})
    parsed.prompt.encode("utf-8")
    if parsed.prompt_tokens < 0 or parsed.max_tokens < 0:
        raise AssertionError(f"negative counts: {parsed}")


def _dict_entry(token: str) -> str:
    """One libFuzzer dictionary line: the token in double quotes, backslash and quote escaped."""
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"\n'


def main(argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["epp"]):
        import epp.requestcontrol.parsing  # noqa: F401  (instrumented for coverage before `check` uses it)
    args = list(argv)
    if not any(not a.startswith("-") for a in args[1:]):  # no corpus directory or input file given
        corpus = Path(tempfile.mkdtemp(prefix="epp-atheris-"))
        for index, seed in enumerate(SEEDS):
            (corpus / f"seed-{index}").write_bytes(seed)
        args.append(str(corpus))
    if not any(a.startswith("-dict=") for a in args):
        dictionary = Path(tempfile.mkdtemp(prefix="epp-atheris-dict-")) / "json.dict"
        dictionary.write_text("".join(_dict_entry(token) for token in DICTIONARY))
        args.append(f"-dict={dictionary}")
    atheris.Setup(args, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
