"""One arm of the overhead benchmark: start its processes, warm up, then climb the ladder of rates.

A step *passes* when errors < 1 %, p99 <= the bound, dropped iterations < 1 % and the achieved rate >= 90 %
of the target. A failed step is retried once (the machine is shared); after a confirmed failure the gap to
the last passing rate is bisected. The highest passing rate is the arm's sustainable requests/s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.overhead.arms import Arm, Settings, picker_child
from benchmarks.overhead.measure import Running, measure_idle, measure_step, run_k6
from benchmarks.overhead.upstream import InstantUpstream
from epp_lab.envoy_launcher import Envoy, EnvoyOptions
from epp_lab.procs import Child


async def start_envoy(envoy: Envoy, response_body_none: bool) -> None:
    """Start Envoy; the "+resp-none" modes set the ext_proc filter's response_body_mode to NONE."""
    if response_body_none:
        envoy.options.processing_mode["response_body_mode"] = "NONE"
    await envoy.start()


async def climb(
    run: Running, settings: Settings, repeat: int, workdir: Path
) -> tuple[list[dict], int | None]:
    """The rate ladder for one arm: returns the step rows and the highest passing rate."""
    rows: list[dict] = []

    async def step(rate: int) -> bool:
        row = await measure_step(run, rate, settings.step_s, settings, workdir)
        row["repeat"] = repeat
        row["idle_picker_cores"] = run.idle_picker_cores
        row["idle_upstream_cores"] = run.idle_upstream_cores
        rows.append(row)
        flag = "ok  " if row["ok"] else "FAIL"
        print(
            f"  {flag} {run.arm.label:34} rate {rate:5d}  got {row['achieved_rps']:7.1f}/s  "
            f"p50 {row['p50_ms']:7.2f}  p99 {row['p99_ms']:8.2f} ms  err {row['errors']:5d}  "
            f"drop {row['dropped']:5d}  picker {row['cpu_s_per_1k']} s/1k  "
            f"others {row['other_tenants_cores']}",
            flush=True,
        )
        return bool(row["ok"])

    async def confirmed(rate: int) -> bool:
        if await step(rate):
            return True
        rows[-1]["superseded"] = True  # a retry follows; the summary uses the last attempt
        return await step(rate)

    passed: int | None = None
    failed: int | None = None
    for rate in settings.rates:
        if await confirmed(rate):
            passed = rate
        else:
            failed = rate
            break
    if passed is not None and failed is not None:
        low, high = passed, failed
        for _ in range(settings.bisect):
            mid = int(round((low + high) / 2 / 50) * 50)
            if mid <= low or mid >= high:
                break
            if await confirmed(mid):
                low = passed = mid
            else:
                high = mid
    return rows, passed


async def run_arm(
    arm: Arm, upstream: InstantUpstream, settings: Settings, repeat: int
) -> tuple[list[dict], dict]:
    pool = upstream.addresses[: arm.endpoints]
    with tempfile.TemporaryDirectory(prefix="epp-overhead-") as tmp:
        workdir = Path(tmp)
        picker: Child | None = None
        envoy: Envoy | None = None
        try:
            options = EnvoyOptions(shape=arm.shape, pool=pool, lb_policy="ROUND_ROBIN")
            if arm.name != "no-extproc":
                picker = picker_child(arm, pool, settings, workdir)
                ports = await picker.start()
                options.epp_port = ports["extproc"]
            envoy = Envoy(options)
            await start_envoy(envoy, arm.response_body_none)
            run = Running(arm, envoy, upstream, picker)
            # Warm up (connections, first scrapes), check the arm works, then the picker's idle CPU.
            warm = await run_k6(envoy.url, 100, settings.warmup_s, arm, settings, workdir)
            if warm["error_rate"] >= 0.5:
                raise RuntimeError(
                    f"{arm.label}: warm-up failed ({warm['errors']} errors of {warm['requests']}); "
                    f"Envoy log:\n{envoy.log_tail()}"
                )
            await measure_idle(run, settings.idle_s)
            rows, passed = await climb(run, settings, repeat, workdir)
            info = {
                "arm": arm.name,
                "mode": arm.mode,
                "endpoints": arm.endpoints,
                "repeat": repeat,
                "sustainable_rate": passed,
                "idle_picker_cores": run.idle_picker_cores,
                "idle_upstream_cores": run.idle_upstream_cores,
                "warmup_error_rate": warm["error_rate"],
            }
            return rows, info
        finally:
            if envoy is not None:
                await envoy.stop()
            if picker is not None:
                await picker.stop()
