"""CPU seconds the scraper's process spends per 1,000 scrapes: aiohttp vs `epp.datalayer.scrape.http_get`.

A separate process (this script with `--serve`, so its CPU is not counted) serves a realistic 32 KB vLLM
/metrics page (`bench_metrics_parse.build_vllm_page`) on `--endpoints` ports of 127.0.0.1, from a raw asyncio
protocol that answers each request with pre-built bytes. In this process a real `MetricsScraper` scrapes
every port every `--interval` seconds for `--seconds`; CPU is `time.process_time()` over that window, after a
warm-up with every connection open. Arms:

- `aiohttp`: the scraper as it was, one shared `aiohttp.ClientSession` (keep-alive, no connection cap,
  `ClientTimeout(total=timeout)`); same scrape loop, parser and bookkeeping, only `_fetch` differs;
- `http_get`: the scraper as it is, one `KeepAliveGet` connection per endpoint;
- `http_get+cap`: the same with the default `max_scrapes_per_second` (only run where it binds).

Both uncapped arms run with `max_scrapes_per_second=None` so that they try the full target rate.

Each arm runs on the default asyncio loop and on uvloop (what `epp serve` uses), alternating arms back to back
for `--rounds` rounds because the machine is shared; the best round is reported (least disturbed), and the
median over rounds of each arm's CPU relative to the aiohttp run just before it. Run:

    .venv/bin/python benchmarks/bench_scrape.py [--endpoints 64 256] [--seconds 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_metrics_parse
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # epp, when run as a script

from epp.config import ScrapeConfig
from epp.datalayer.endpoints import Endpoint, EndpointPool
from epp.datalayer.scrape.extract import parse_metrics
from epp.datalayer.scrape.scraper import MetricsScraper
from epp_lab.procs import Child

DEFAULT_MAX_SCRAPES_PER_SECOND = ScrapeConfig().max_scrapes_per_second or 0.0

RESULT = Path(__file__).resolve().parent / "results" / "scrape.json"


# -- server process ---------------------------------------------------------------------------------------


class _Page(asyncio.Protocol):
    """Answers every GET head with the same pre-built response (keep-alive)."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        data = self.pending + data
        requests = data.count(b"\r\n\r\n")
        self.pending = data[data.rfind(b"\r\n\r\n") + 4 :] if requests else data
        for _ in range(requests):
            self.transport.write(self.response)


def _page() -> bytes:
    """The page of `bench_metrics_parse.py --models 1`: one model, process/GC collectors, ~32 KB."""
    from bench_metrics_parse import build_vllm_page

    return build_vllm_page(models=("model-0",), waiting=(1,), running=(2,), kv_usage=(0.5,)).encode()


async def _serve(endpoints: int, chunked: bool, ready_file: str) -> None:
    page = _page()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
    if chunked:  # 4 KiB chunks, as a streamed body would be (uvicorn sends one chunk per ASGI body message)
        body = b"".join(
            b"%x\r\n%s\r\n" % (len(page[i : i + 4096]), page[i : i + 4096]) for i in range(0, len(page), 4096)
        )
        response = head + b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"
    else:
        response = head + b"Content-Length: %d\r\n\r\n" % len(page) + page
    loop = asyncio.get_running_loop()
    ports = []
    for _ in range(endpoints):
        server = await loop.create_server(lambda: _Page(response), "127.0.0.1", 0)
        ports.append(server.sockets[0].getsockname()[1])
    tmp = ready_file + ".tmp"
    Path(tmp).write_text(json.dumps({"ports": ports, "page_bytes": len(page)}))
    os.replace(tmp, ready_file)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()  # until the parent stops us


class _PageServers:
    """The page servers as a child process (`epp_lab.procs.Child`), started and stopped from this
    synchronous benchmark on a private event loop."""

    def __init__(self, endpoints: int, chunked: bool) -> None:
        argv = [sys.executable, __file__, "--serve", str(endpoints)] + (["--chunked"] if chunked else [])
        self.child = Child("page-servers", argv, ready_file=True)
        self.loop = asyncio.new_event_loop()

    def __enter__(self) -> dict[str, Any]:
        return self.loop.run_until_complete(self.child.start())

    def __exit__(self, *exc: object) -> None:
        self.loop.run_until_complete(self.child.stop())
        self.loop.close()


# -- scraper arms -----------------------------------------------------------------------------------------


class AiohttpFetch:
    """The previous implementation's transport: one shared aiohttp session for all endpoints."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path, self.timeout = path, timeout
        self._session: aiohttp.ClientSession | None = None

    async def __call__(self, endpoint: Endpoint) -> tuple[int, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                raise_for_status=False,
            )
        try:
            async with self._session.get(f"http://{endpoint.address}{self.path}") as response:
                if response.status != 200:
                    return response.status, b""
                return response.status, await response.read()
        except aiohttp.ClientError as exc:
            raise OSError(str(exc)) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


async def _measure(arm: str, ports: list[int], interval: float, seconds: float) -> dict[str, Any]:
    pool = EndpointPool([Endpoint(f"127.0.0.1:{port}") for port in ports])
    # Raw cost per scrape: no scrape budget, except in the arm that shows what the default budget does.
    cap = DEFAULT_MAX_SCRAPES_PER_SECOND if arm == "http_get+cap" else None
    config = ScrapeConfig(interval_s=interval, timeout_s=2.0, max_scrapes_per_second=cap)
    aiohttp_fetch = AiohttpFetch(config.path, config.timeout_s) if arm == "aiohttp" else None
    scraper = MetricsScraper(pool, config, fetch=aiohttp_fetch)
    try:
        assert await scraper.scrape_all() == len(ports), "warm-up scrape failed"
        await scraper.start()
        await asyncio.sleep(min(1.0, seconds / 3))  # warm-up: loops desynchronised, caches warm
        ok0 = sum(s.ok for s in scraper.stats.values())
        failed0 = sum(s.failed for s in scraper.stats.values())
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        scrapes = sum(s.ok for s in scraper.stats.values()) - ok0
        failed = sum(s.failed for s in scraper.stats.values()) - failed0
    finally:
        await scraper.stop()
        if aiohttp_fetch is not None:
            await aiohttp_fetch.close()
    target = min(len(ports) / interval, cap or float("inf"))
    return {
        "arm": arm,
        "scrapes": scrapes,
        "failed": failed,
        "scrapes_per_s": round(scrapes / wall),
        "target_per_s": round(target),
        "cpu_s_per_1000_scrapes": round(cpu / scrapes * 1000, 4),
        "cores_used": round(cpu / wall, 3),
    }


def _run_arm(arm: str, loop_name: str, ports: list[int], interval: float, seconds: float) -> dict[str, Any]:
    if loop_name == "uvloop":
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    else:
        runner = asyncio.Runner()
    with runner:
        return runner.run(_measure(arm, ports, interval, seconds))


def _parse_cost(rounds: int = 2000) -> float:
    page = _page()
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(rounds):
            parse_metrics(page.decode("utf-8", "replace"), "vllm")
        best = min(best, (time.process_time() - start) / rounds)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", type=int, metavar="N", help=argparse.SUPPRESS)  # server process mode
    parser.add_argument("--chunked", action="store_true", help="serve Transfer-Encoding: chunked (4 KiB)")
    parser.add_argument("--endpoints", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--interval", type=float, default=0.05, help="per-endpoint interval (default 0.05)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured window per run (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per setting (default 2)")
    parser.add_argument("--loops", nargs="+", default=["asyncio", "uvloop"])
    parser.add_argument("--arms", nargs="+", default=["aiohttp", "http_get", "http_get+cap"])
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/scrape.json")
    parser.add_argument("--ready-file", help=argparse.SUPPRESS)  # server process mode
    args = parser.parse_args()
    if args.serve:
        try:
            import uvloop

            uvloop.run(_serve(args.serve, args.chunked, args.ready_file))
        except ImportError:
            asyncio.run(_serve(args.serve, args.chunked, args.ready_file))
        return

    parse_s = _parse_cost()
    print(f"parse_metrics alone (decode + parse of the page): {parse_s * 1e3:.4f} ms CPU")
    rows: list[dict[str, Any]] = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    for n in args.endpoints:
        with _PageServers(n, args.chunked) as info:
            for round_ in range(args.rounds):
                for loop_name in args.loops:
                    for arm in args.arms:
                        if arm == "http_get+cap" and n / args.interval <= DEFAULT_MAX_SCRAPES_PER_SECOND:
                            continue  # the cap does not bind: same as http_get
                        row = {"endpoints": n, "loop": loop_name, "round": round_}
                        row |= _run_arm(arm, loop_name, info["ports"], args.interval, args.seconds)
                        rows.append(row)
                        print(json.dumps(row), flush=True)

    best: list[dict[str, Any]] = []
    for n in args.endpoints:
        for loop_name in args.loops:
            for arm in args.arms:
                runs = [r for r in rows if (r["endpoints"], r["loop"], r["arm"]) == (n, loop_name, arm)]
                if not runs:
                    continue
                top = min(runs, key=lambda r: r["cpu_s_per_1000_scrapes"])
                per_scrape = top["cpu_s_per_1000_scrapes"] / 1000
                # Paired per round (the arms ran back to back): robust to the machine's load drifting.
                ratios = [
                    r["cpu_s_per_1000_scrapes"] / base["cpu_s_per_1000_scrapes"]
                    for r in runs
                    for base in rows
                    if (base["endpoints"], base["loop"], base["round"], base["arm"])
                    == (n, loop_name, r["round"], "aiohttp")
                ]
                best.append(
                    {
                        "endpoints": n,
                        "loop": loop_name,
                        "arm": arm,
                        "ms_cpu_per_scrape": round(per_scrape * 1e3, 4),
                        "cpu_s_per_1000_scrapes": top["cpu_s_per_1000_scrapes"],
                        "achieved_per_s": top["scrapes_per_s"],
                        "target_per_s": top["target_per_s"],
                        # What the full target rate would cost (the aiohttp arm may not reach it).
                        "cores_at_target": round(per_scrape * top["target_per_s"], 3),
                        "cores_at_256x20Hz": round(per_scrape * 5120, 3),
                        "cores_used": top["cores_used"],  # measured; below cores_at_target if CPU-starved
                        "median_ratio_to_aiohttp": round(statistics.median(ratios), 3) if ratios else None,
                    }
                )
    print(
        f"\n{'endpoints':>9} {'loop':>8} {'arm':>12} {'ms/scrape':>10} {'target/s':>8} {'achieved/s':>10} "
        f"{'cores@target':>12} {'cores used':>10} {'vs aiohttp':>10}"
    )
    for b in best:
        print(
            f"{b['endpoints']:>9} {b['loop']:>8} {b['arm']:>12} {b['ms_cpu_per_scrape']:>10.4f} "
            f"{b['target_per_s']:>8} {b['achieved_per_s']:>10} {b['cores_at_target']:>12.3f} "
            f"{b['cores_used']:>10.3f} {b['median_ratio_to_aiohttp']!s:>10}"
        )
    if args.no_write:
        return
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    result = {
        "benchmark": "scrape",
        "command": shlex.join([exe, *sys.argv]),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "nproc": os.cpu_count(),
        "machine_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "load_average_at_start": load_before,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: version(name) for name in ("aiohttp", "uvloop")},
        "page_bytes": info["page_bytes"],
        "chunked": args.chunked,
        "interval_s": args.interval,
        "seconds_per_run": args.seconds,
        "parse_ms_cpu": round(parse_s * 1e3, 4),
        "best_of_rounds": best,
        "runs": rows,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
