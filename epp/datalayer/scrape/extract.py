"""Parse a model server's Prometheus text into the few numbers the scheduler reads.

Targeted scanner, not a Prometheus parser: one regex per engine finds, in a single pass in C, the sample
lines whose name is exactly one of the wanted metrics (`re` searches for the names' literal prefix and checks
that the name ends with `{`, space or tab, so `<name>_bucket`, `<name>_total` of other metrics and `# HELP` /
`# TYPE` lines never match). Only those few lines are split into labels and value; the rest of the page
(histogram buckets, process metrics) is never tokenised. `benchmarks/bench_metrics_parse.py`: a 32 KB vLLM
page (404 lines, 12 histograms) parses in 36-47 µs (best of 5 runs, varying with machine load), 56 KB (two
models) in ~55 µs; prometheus_client's parser takes 9-11 ms and 19 ms (CPython 3.11, shared 2-core
machine, where merely counting the page's newlines takes 13 µs).

Signals per engine are data in `epp.datalayer.engines`; how several series of one metric combine (servers
export one series per `model_name`, per LoRA or per data-parallel rank):

- waiting, running: **sum** over series (each series counts distinct requests on this server).
- KV usage: **max** over series, clamped to [0, 1]. Series of one server usually repeat the same cache (max
  = that value); when they are distinct caches (data-parallel ranks) the fullest one preempts and queues
  first, so max never hides a nearly full cache from the saturation check, whereas a mean would.
- cache shape (block size, number of blocks): max over series (duplicates are common; a sum would count
  one cache several times).
- served models: the `model_name` label values of the running-requests series (vLLM and SGLang label
  every series with the served base model; LoRA adapters are not among them).
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
from dataclasses import dataclass, field
from typing import NamedTuple

from epp.datalayer.endpoints import MetricsSnapshot
from epp.datalayer.engines import ENGINE_METRICS, EngineMetrics, Source


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
    """What one page says (`metrics`, not yet stamped with a scrape time) and what was wrong with it."""

    metrics: MetricsSnapshot = field(default_factory=MetricsSnapshot)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every required signal (waiting, running, KV usage) was found."""
        return not any(p.kind in ("missing", "unknown-engine") for p in self.problems)

    def snapshot(self, updated_at: float) -> MetricsSnapshot:
        self.metrics.updated_at = updated_at
        return self.metrics


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


Sample = tuple[dict[str, str], float]


class _Page:
    """The wanted lines of one page and the problems found reading them. Each metric's lines are parsed
    once, however many signals read them (cache shape reads two labels of one info gauge)."""

    __slots__ = ("_parsed", "lines", "problems")

    def __init__(self, lines: Lines) -> None:
        self.lines = lines
        self.problems: list[Problem] = []
        self._parsed: dict[str, list[Sample]] = {}

    def samples(self, source: Source) -> list[Sample]:
        """Parsed `(labels, value)` of `source` (its name, or `name_total` if the name is absent), only the
        series matching `source.where`. Unparsable lines are reported (once) and skipped."""
        parsed = self._parsed.get(source.name)
        if parsed is None:
            parsed = self._parsed[source.name] = []
            name = source.name
            for rest in self.lines.get(name) or self.lines.get(name + "_total") or ():
                sample = _parse_rest(rest)
                if sample is None:
                    self.problems.append(Problem("unparsable", name, repr((name + rest)[:200])))
                else:
                    parsed.append(sample)
        where = source.where
        if where is None:
            return parsed
        return [s for s in parsed if s[0].get(where[0]) == where[1]]

    def values(self, source: Source) -> list[float] | None:
        """Finite values of `source` (label values with `source.label`); None when it has no sample."""
        samples = self.samples(source)
        if not samples:
            return None
        if source.label is not None:
            return [float(self._int_label(labels, source)) for labels, _ in samples]
        values = [v for _, v in samples if math.isfinite(v)]
        if len(values) < len(samples):
            self.problems.append(Problem("non-finite", str(source)))
        return values

    def total(self, source: Source) -> float:
        """Required, summed over series; missing (or no finite sample) is a problem and reads 0."""
        values = self.values(source)
        if not values:
            self.problems.append(Problem("missing", str(source)))
            return 0.0
        try:
            return math.fsum(values)
        except OverflowError:  # finite values whose sum is not (a lying server): no usable value
            self.problems.append(Problem("missing", str(source), "its series sum beyond any float"))
            return 0.0

    def highest(self, sources: tuple[Source, ...], required: bool) -> float:
        """Max over series of the first of `sources` having a finite sample (0 if none; missing if
        required)."""
        for source in sources:
            values = self.values(source)
            if values:
                return max(values)
        if required:
            self.problems.append(Problem("missing", str(sources[0])))
        return 0.0

    def _int_label(self, labels: dict[str, str], source: Source) -> int:
        """Integer label value, 0 when absent; a bad value (vLLM writes "None" before profiling) is a
        problem."""
        assert source.label is not None
        raw = labels.get(source.label, "")
        if not raw:
            return 0
        try:
            return int(float(raw))
        except (ValueError, OverflowError):
            self.problems.append(Problem("bad-label", f"{source.name}{{{source.label}}}", repr(raw)))
            return 0


def _adapters(value: str) -> frozenset[str]:
    return frozenset(a for a in (s.strip() for s in value.split(",")) if a)


def _timestamp(sample: Sample) -> float:
    return -math.inf if math.isnan(sample[1]) else sample[1]


def _read(page: _Page, engine: EngineMetrics) -> MetricsSnapshot:
    m = MetricsSnapshot(  # counts are never negative: a server claiming so would turn scores into NaN
        waiting=max(0.0, page.total(engine.waiting)),
        running=max(0.0, page.total(engine.running)),
        kv_usage=min(1.0, max(0.0, page.highest(engine.kv_usage, required=True))),
        served_models=frozenset(
            name for labels, _ in page.samples(engine.running) if (name := labels.get("model_name"))
        ),
    )
    if engine.block_size is not None:
        m.block_size = int(page.highest((engine.block_size,), required=False))
    if engine.num_blocks is not None:
        m.num_blocks = int(page.highest((engine.num_blocks,), required=False))
    if engine.lora_info is not None:
        current = max(page.samples(engine.lora_info), key=_timestamp, default=None)
        if current is not None:
            labels = current[0]
            m.running_loras = _adapters(labels.get("running_lora_adapters", ""))
            m.waiting_loras = _adapters(labels.get("waiting_lora_adapters", ""))
            m.max_lora = page._int_label(labels, Source(engine.lora_info.name, label="max_lora"))
    return m


# engine -> (scanner for the metric names it reads, where the signals are)
_SCANNERS: dict[str, tuple[_Scanner, EngineMetrics]] = {
    name: (_Scanner(engine.metric_names()), engine) for name, engine in ENGINE_METRICS.items()
}


def parse_metrics(text: str, engine: str) -> ParseResult:
    """Read waiting/running/KV usage, cache shape and LoRA state of `engine` (an `ENGINES` name) from a
    Prometheus text page. Never raises: everything wrong with the page is in `result.problems`."""
    entry = _SCANNERS.get(engine)
    if entry is None:
        return ParseResult(problems=[Problem("unknown-engine", engine)])
    scan, sources = entry
    page = _Page(scan(text))
    metrics = _read(page, sources)
    return ParseResult(metrics, page.problems)
