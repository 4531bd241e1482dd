"""Parse a model server's Prometheus text into the few numbers the scheduler reads.

Targeted scanner, not a Prometheus parser: one regex per engine finds, in a single pass in C, the sample
lines whose name is exactly one of the wanted metrics (`re` searches for the names' literal prefix and checks
that the name ends with `{`, space or tab, so `<name>_bucket`, `<name>_total` of other metrics and `# HELP` /
`# TYPE` lines never match). Only those few lines are split into labels and value; the rest of the page
(histogram buckets, process metrics) is never tokenised. `benchmarks/bench_metrics_parse.py`: a 32 KB vLLM
page (404 lines, 12 histograms) parses in 36-47 µs (best of 5 runs, varying with machine load), 56 KB (two
models) in ~55 µs; prometheus_client's parser takes 9-11 ms and 19 ms (CPython 3.11, shared 2-core
machine, where merely counting the page's newlines takes 13 µs).

Signals per engine (see docs/protocol.md §4) and how several series of one metric combine (servers export
one series per `model_name`, per LoRA or per data-parallel rank):

- waiting, running: **sum** over series (each series counts distinct requests on this server).
- KV usage: **max** over series, clamped to [0, 1]. Series of one server usually repeat the same cache (max
  = that value); when they are distinct caches (data-parallel ranks) the fullest one preempts and queues
  first, so max never hides a nearly full cache from the saturation check, whereas a mean would.
- cache shape (block size, number of blocks): max over series (duplicates are common; a sum would count
  one cache several times).
- vLLM LoRA (`vllm:lora_requests_info`): the value is a timestamp; the series with the largest value is
  current. Adapters are comma-separated label values (empty string = none).

waiting, running and KV usage are required: a page without one of them gets a `missing` problem and
`ok` is False (defaulting to 0 would make a broken server look idle). Cache shape and LoRA are optional.
Samples whose value is NaN or ±Inf are skipped (`non-finite` problem; a required signal with no finite
sample is also `missing`); a wanted line that does not parse is
skipped (`unparsable` problem). Lines of metrics we do not want are not checked at all. A counter exported
only under its OpenMetrics name `<name>_total` is accepted when `<name>` itself is absent.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from epp.datastore.endpoints import MetricsSnapshot


class Problem(NamedTuple):
    """Something wrong with a page. `kind` + `metric` identify the problem (stable across scrapes, used to
    log it once); `detail` is the evidence (e.g. the offending line) and may differ between scrapes."""

    kind: str  # "missing" | "unparsable" | "non-finite" | "bad-label" | "unknown-engine"
    metric: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.metric}" + (f": {self.detail}" if self.detail else "")


@dataclass(slots=True)
class ParseResult:
    """The fields of `MetricsSnapshot` read from one page, plus what was wrong with it."""

    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    running_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_lora: int = 0
    block_size: int = 0
    num_blocks: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every required signal (waiting, running, KV usage) was found."""
        return not any(p.kind in ("missing", "unknown-engine") for p in self.problems)

    def snapshot(self, updated_at: float) -> MetricsSnapshot:
        return MetricsSnapshot(
            waiting=self.waiting,
            running=self.running,
            kv_usage=self.kv_usage,
            running_loras=self.running_loras,
            waiting_loras=self.waiting_loras,
            max_lora=self.max_lora,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            updated_at=updated_at,
        )


# The rest of a sample line after its name: optional {labels}, value, optional integer timestamp. Label values
# are quoted strings with `\\`, `\"` and `\n` escapes, so `,` and `}` inside them do not end the label set.
_VALUE = r'[^"\\\n]*(?:\\.[^"\\\n]*)*'  # inside the quotes: no `"`, `\\` or newline unless escaped
_LABEL = rf'[a-zA-Z_][a-zA-Z0-9_]*[ \t]*=[ \t]*"{_VALUE}"'
_REST = re.compile(
    rf"[ \t]*(?:\{{[ \t]*((?:{_LABEL}[ \t]*,[ \t]*)*(?:{_LABEL})?)[ \t]*\}})?"
    rf"[ \t]+(\S+)(?:[ \t]+-?[0-9]+)?\s*"
)
_LABEL_PAIR = re.compile(rf'([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"({_VALUE})"')
_ESCAPE = re.compile(r"\\(.)")

Lines = dict[str, list[str]]  # metric name -> the rest of each of its sample lines


class _Scanner:
    """Finds the sample lines of a fixed set of metric names in one pass.

    One regex `\\n(prefix(?:a|b|...)(?:_total)?)([{ \\t][^\\n]*)`: `re` looks for the literal prefix in C and
    only tries the alternatives where a line starts with it; `[{ \\t]` ends the name exactly, so
    `<name>_bucket` or `<name>_info_x` never match, nor do `# HELP`/`# TYPE` lines.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        prefix = names[0]
        while not all(n.startswith(prefix) for n in names):
            prefix = prefix[:-1]
        alternatives = "|".join(re.escape(n[len(prefix) :]) for n in sorted(names, key=len, reverse=True))
        self._regex = re.compile(rf"\n({re.escape(prefix)}(?:{alternatives})(?:_total)?)([{{ \t][^\n]*)")

    def __call__(self, text: str) -> Lines:
        found: Lines = {}
        for name, rest in self._regex.findall(text):
            if name in found:
                found[name].append(rest)
            else:
                found[name] = [rest]
        if text and text[0] not in "#\n":  # the first line has no newline before it
            newline = text.find("\n")
            for name, rest in self._regex.findall("\n" + (text if newline == -1 else text[:newline])):
                found.setdefault(name, []).insert(0, rest)
        return found


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


@functools.lru_cache(maxsize=4096)
def _parse_rest(rest: str) -> tuple[dict[str, str], float] | None:
    """(labels, value) of a sample line without its name; None if malformed. Cached: the wanted lines of a
    server rarely change between scrapes (same labels, few distinct values). The dict must not be mutated."""
    match = _REST.fullmatch(rest)
    if match is None:
        return None
    try:
        value = float(match.group(2))  # also reads NaN, +Inf, -Inf
    except ValueError:
        return None
    raw = match.group(1)
    return ({k: _unescape(v) for k, v in _LABEL_PAIR.findall(raw)} if raw else {}), value


def _samples(
    lines: Lines, name: str, result: ParseResult, where: tuple[str, str] | None = None
) -> list[tuple[dict[str, str], float]]:
    """Parsed `(labels, value)` of metric `name` (or `name_total` if `name` is absent), optionally only the
    series whose label `where[0]` equals `where[1]`. Unparsable lines are reported and skipped."""
    out: list[tuple[dict[str, str], float]] = []
    for rest in lines.get(name) or lines.get(name + "_total") or ():
        parsed = _parse_rest(rest)
        if parsed is None:
            result.problems.append(Problem("unparsable", name, repr((name + rest)[:200])))
        elif where is None or parsed[0].get(where[0]) == where[1]:
            out.append(parsed)
    return out


def _finite(
    lines: Lines, name: str, result: ParseResult, where: tuple[str, str] | None = None
) -> list[float] | None:
    """Finite values of the series of `name`; None when it has no sample at all (missing)."""
    samples = _samples(lines, name, result, where)
    if not samples:
        return None
    values = [v for _, v in samples if math.isfinite(v)]
    if len(values) < len(samples):
        result.problems.append(Problem("non-finite", _label(name, where)))
    return values


def _label(name: str, where: tuple[str, str] | None) -> str:
    return name if where is None else f'{name}{{{where[0]}="{where[1]}"}}'


def _sum(lines: Lines, name: str, result: ParseResult, where: tuple[str, str] | None = None) -> float | None:
    values = _finite(lines, name, result, where)
    return None if not values else math.fsum(values)


def _max(lines: Lines, name: str, result: ParseResult, where: tuple[str, str] | None = None) -> float | None:
    values = _finite(lines, name, result, where)
    return None if not values else max(values)


def _require(result: ParseResult, value: float | None, metric: str) -> float:
    if value is None:
        result.problems.append(Problem("missing", metric))
        return 0.0
    return value


def _int_label(result: ParseResult, labels: dict[str, str], key: str, metric: str) -> int:
    """Integer label value, 0 when absent; a bad value (vLLM writes "None" before profiling) is reported."""
    raw = labels.get(key, "")
    if not raw:
        return 0
    try:
        return int(float(raw))
    except (ValueError, OverflowError):
        result.problems.append(Problem("bad-label", f"{metric}{{{key}}}", repr(raw)))
        return 0


def _shape_from_labels(lines: Lines, name: str, result: ParseResult, size_key: str, count_key: str) -> None:
    for labels, _ in _samples(lines, name, result):
        result.block_size = max(result.block_size, _int_label(result, labels, size_key, name))
        result.num_blocks = max(result.num_blocks, _int_label(result, labels, count_key, name))


def _adapters(value: str) -> frozenset[str]:
    return frozenset(a for a in (s.strip() for s in value.split(",")) if a)


def _timestamp(sample: tuple[dict[str, str], float]) -> float:
    return -math.inf if math.isnan(sample[1]) else sample[1]


def _read_vllm(lines: Lines, result: ParseResult) -> None:
    for attr, name in (("waiting", "vllm:num_requests_waiting"), ("running", "vllm:num_requests_running")):
        setattr(result, attr, _require(result, _sum(lines, name, result), name))
    kv = _max(lines, "vllm:kv_cache_usage_perc", result)
    if kv is None:  # the name before vLLM 0.10 (V0 engine)
        kv = _max(lines, "vllm:gpu_cache_usage_perc", result)
    result.kv_usage = _require(result, kv, "vllm:kv_cache_usage_perc")
    _shape_from_labels(lines, "vllm:cache_config_info", result, "block_size", "num_gpu_blocks")
    name = "vllm:lora_requests_info"
    current = max(_samples(lines, name, result), key=_timestamp, default=None)
    if current is not None:
        labels = current[0]
        result.running_loras = _adapters(labels.get("running_lora_adapters", ""))
        result.waiting_loras = _adapters(labels.get("waiting_lora_adapters", ""))
        result.max_lora = _int_label(result, labels, "max_lora", name)


def _read_sglang(lines: Lines, result: ParseResult) -> None:
    for attr, name in (("waiting", "sglang:num_queue_reqs"), ("running", "sglang:num_running_reqs")):
        setattr(result, attr, _require(result, _sum(lines, name, result), name))
    result.kv_usage = _require(result, _max(lines, "sglang:token_usage", result), "sglang:token_usage")
    _shape_from_labels(lines, "sglang:cache_config_info", result, "page_size", "num_pages")


def _read_trtllm_serve(lines: Lines, result: ParseResult) -> None:
    for attr, name in (
        ("waiting", "trtllm_num_requests_waiting"),
        ("running", "trtllm_num_requests_running"),
    ):
        setattr(result, attr, _require(result, _sum(lines, name, result), name))
    name = "trtllm_kv_cache_utilization"
    result.kv_usage = _require(result, _max(lines, name, result), name)
    result.block_size = int(_max(lines, "trtllm_kv_cache_tokens_per_block", result) or 0)
    result.num_blocks = int(_max(lines, "trtllm_kv_cache_max_blocks", result) or 0)


def _read_triton_trtllm(lines: Lines, result: ParseResult) -> None:
    requests, blocks = "nv_trt_llm_request_metrics", "nv_trt_llm_kv_cache_block_metrics"
    for attr, where in (("waiting", ("request_type", "waiting")), ("running", ("request_type", "scheduled"))):
        setattr(result, attr, _require(result, _sum(lines, requests, result, where), _label(requests, where)))
    where = ("kv_cache_block_type", "fraction")
    result.kv_usage = _require(result, _max(lines, blocks, result, where), _label(blocks, where))
    result.block_size = int(_max(lines, blocks, result, ("kv_cache_block_type", "tokens_per")) or 0)
    result.num_blocks = int(_max(lines, blocks, result, ("kv_cache_block_type", "max")) or 0)


# engine -> (scanner for the metric names it reads, reader of the found lines)
_ENGINES: dict[str, tuple[_Scanner, Callable[[Lines, ParseResult], None]]] = {
    "vllm": (
        _Scanner(
            (
                "vllm:num_requests_waiting",
                "vllm:num_requests_running",
                "vllm:kv_cache_usage_perc",
                "vllm:gpu_cache_usage_perc",
                "vllm:cache_config_info",
                "vllm:lora_requests_info",
            )
        ),
        _read_vllm,
    ),
    "sglang": (
        _Scanner(
            (
                "sglang:num_queue_reqs",
                "sglang:num_running_reqs",
                "sglang:token_usage",
                "sglang:cache_config_info",
            )
        ),
        _read_sglang,
    ),
    "trtllm-serve": (
        _Scanner(
            (
                "trtllm_num_requests_waiting",
                "trtllm_num_requests_running",
                "trtllm_kv_cache_utilization",
                "trtllm_kv_cache_tokens_per_block",
                "trtllm_kv_cache_max_blocks",
            )
        ),
        _read_trtllm_serve,
    ),
    "triton-trtllm": (
        _Scanner(("nv_trt_llm_request_metrics", "nv_trt_llm_kv_cache_block_metrics")),
        _read_triton_trtllm,
    ),
}


def parse_metrics(text: str, engine: str) -> ParseResult:
    """Read waiting/running/KV usage, cache shape and LoRA state of `engine` (an `ENGINES` name) from a
    Prometheus text page. Never raises: everything wrong with the page is in `result.problems`."""
    result = ParseResult()
    entry = _ENGINES.get(engine)
    if entry is None:
        result.problems.append(Problem("unknown-engine", engine))
        return result
    scan, read = entry
    read(scan(text), result)
    result.kv_usage = min(1.0, max(0.0, result.kv_usage))
    return result
