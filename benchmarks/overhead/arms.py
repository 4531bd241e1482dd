"""The arms of the overhead benchmark, and the settings of a run (rate ladder, step length, repeats).

    no-extproc    Envoy `direct` shape, ROUND_ROBIN over 64 instant endpoints (no picker at all)
    noop-extproc  Envoy `gateway` / `buffered` shape -> `noop_extproc.py` (one fixed destination)
    epp           the same shapes -> `epp serve --plaintext` over 8, 64 or 256 instant endpoints

`picker_child(arm, pool, settings, workdir)` is the arm's ext_proc server as an `epp_lab.procs.Child`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPO
from epp_lab.procs import Child, picker_argv

# Request body modes (Envoy shapes `gateway` and `buffered`), and the same with the ext_proc filter's
# response_body_mode set to NONE ("+resp-none": the response body bypasses the picker; only its headers and
# trailers are sent), to show what echoing the response body costs.
MODES = ("full-duplex", "buffered", "full-duplex+resp-none", "buffered+resp-none")
DEFAULT_MODES = {"quick": MODES[:3], "full": MODES}
RESP_NONE = "+resp-none"
SHAPE_OF_MODE = {"full-duplex": "gateway", "buffered": "buffered"}
ENDPOINT_COUNTS = (8, 64, 256)
BASELINE_ENDPOINTS = 64  # pool of the no-extproc arm, and the N at which the targets are evaluated
ARM_ORDER = ("no-extproc", "noop-extproc", "epp")


@dataclass(frozen=True, slots=True)
class Arm:
    name: str  # no-extproc | noop-extproc | epp
    mode: str  # full-duplex | buffered | "-" (no ext_proc)
    endpoints: int  # instant endpoints the arm routes over (noop: 1, a fixed destination)

    @property
    def shape(self) -> str:
        return "direct" if self.name == "no-extproc" else SHAPE_OF_MODE[self.mode.removesuffix(RESP_NONE)]

    @property
    def response_body_none(self) -> bool:
        return self.mode.endswith(RESP_NONE)

    @property
    def label(self) -> str:
        return f"{self.name}/{self.mode}/{self.endpoints}"


def all_arms(names: list[str], modes: list[str], counts: list[int]) -> list[Arm]:
    arms: list[Arm] = []
    if "no-extproc" in names:
        arms.append(Arm("no-extproc", "-", BASELINE_ENDPOINTS))
    for mode in modes:
        if "noop-extproc" in names:
            arms.append(Arm("noop-extproc", mode, 1))
        if "epp" in names:
            # The response-body variant only at the N where the targets are evaluated (if it is run).
            sizes = (
                [n for n in counts if n == BASELINE_ENDPOINTS] or counts[:1] if RESP_NONE in mode else counts
            )
            arms.extend(Arm("epp", mode, n) for n in sizes)
    return arms


@dataclass(slots=True)
class Settings:
    quick: bool
    rates: list[int]
    step_s: float
    warmup_s: float
    idle_s: float
    repeats: int
    bisect: int  # bisection steps after a confirmed failure
    p99_bound_ms: float = 50.0
    max_error_rate: float = 0.01
    scrape_interval: float | None = None  # None: the picker's default
    extra_epp_args: list[str] = field(default_factory=list)


QUICK_RATES = [100, 200, 400, 800, 1200, 1600, 2400, 3200, 4800]
FULL_RATES = [100, 200, 300, 400, 600, 800, 1000, 1200, 1400, 1600, 2000, 2400, 3200, 4000, 4800, 6400]


def picker_child(arm: Arm, pool: list[str], settings: Settings, workdir: Path) -> Child:
    """The arm's ext_proc server (the no-op or `epp serve`), ready once it wrote its ports."""
    if arm.name == "noop-extproc":
        argv = [sys.executable, "-m", "benchmarks.overhead.noop_extproc", "--destination", pool[0],
                "--port", "0"]  # fmt: skip
    else:
        extra = ["--seed", "1"]
        if settings.scrape_interval is not None:
            extra += ["--scrape-interval", str(settings.scrape_interval)]
        argv = picker_argv(pool, extra=extra + settings.extra_epp_args)
    return Child(arm.name, argv, ready_file=True, cwd=REPO, log=workdir / f"{arm.name}.log", timeout=30.0)
