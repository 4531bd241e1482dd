"""`epp sim ...` (or `python -m epp_lab.sim.cli ...`): run a simulated vLLM fleet (N replicas on N ports in
one process) until SIGINT/SIGTERM.

The options are `FleetConfig`'s fields (`--num-gpu-blocks` sets `num_gpu_blocks`, ...), with the help texts
and CLI defaults stored on the fields, plus `--ready-file`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys

from epp_lab.sim.config import FleetConfig
from epp_lab.sim.fleet import SimFleet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epp sim",
        description="Simulated vLLM fleet: OpenAI-compatible replicas with continuous batching, a "
        "prefix-cached KV cache, LoRA slots and vLLM's /metrics, on a latency profile instead of a GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(FleetConfig):
        meta = f.metadata
        options: dict = {"help": meta["help"], "default": meta.get("cli_default", f.default)}
        if meta.get("parse") is not None:
            options["type"] = meta["parse"]
        if meta.get("choices") is not None:
            options["choices"] = meta["choices"]
        p.add_argument(f"--{f.name.replace('_', '-')}", **options)
    p.add_argument(
        "--ready-file",
        default=None,
        metavar="PATH",
        help='once every replica listens, write {"addresses": ["host:port", ...]} to PATH (atomically)',
    )
    return p


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    """The `FleetConfig` of parsed arguments; `ValueError` lists every invalid setting."""
    return FleetConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FleetConfig)})


def _write_ready(path: str, addresses: list[str]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"addresses": addresses}, f)
    os.replace(tmp, path)  # readers never see a half-written file


async def serve(config: FleetConfig, ready_file: str | None = None) -> None:
    """Run the fleet until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with SimFleet(config) as fleet:
        if ready_file:
            _write_ready(ready_file, fleet.addresses)
        print(
            f"epp sim: {len(fleet.addresses)} replica(s) of {config.model} ({config.profile}, "
            f"time scale {config.time_scale}) on {', '.join(fleet.addresses)}",
            flush=True,
        )
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"epp sim: {e}", file=sys.stderr)
        return 2
    try:
        import uvloop  # optional speedup, chosen here only

        runner: asyncio.Runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(serve(config, args.ready_file))
    except OSError as e:
        print(f"epp sim: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        pass
    finally:
        if args.ready_file:
            with contextlib.suppress(OSError):
                os.unlink(args.ready_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
