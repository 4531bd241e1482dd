"""`epp sim ...`: run a simulated vLLM fleet (N replicas on N ports in one process) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys

from epp.sim.profiles import DEFAULT_PROFILE, PROFILES
from epp.sim.server import DEFAULT_MODEL, FleetConfig, SimFleet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epp sim",
        description="Simulated vLLM fleet: OpenAI-compatible replicas with continuous batching, a "
        "prefix-cached KV cache, LoRA slots and vLLM's /metrics, on a latency profile instead of a GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--replicas", type=int, default=4, help="replicas, one port each (4 = the picker's default pool)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument(
        "--base-port",
        type=int,
        default=8100,
        help="port of the first replica; the others use the following ports. 0 = an ephemeral port per "
        "replica (see --ready-file and the printed addresses)",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model name served (and the hash seed)")
    p.add_argument(
        "--lora-adapters",
        default="",
        help="comma-separated LoRA adapter names also served (requests name them in 'model')",
    )
    p.add_argument("--max-lora", type=int, default=4, help="resident LoRA adapter slots per replica")
    p.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        choices=sorted(PROFILES),
        help="latency profile (prefill/decode/LoRA costs, default KV size); see epp/sim/profiles.py",
    )
    p.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=None,
        help="KV-cache blocks of 16 tokens per replica (default: the profile's)",
    )
    p.add_argument(
        "--max-num-seqs", type=int, default=None, help="max running requests per replica (default: 256)"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="token budget of one engine step, chunked prefill (default: 8192)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="real seconds per simulated second (0.1 = ten times faster than real time)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the generated output text")
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per SSE event (first and last tokens are always sent at once)",
    )
    p.add_argument(
        "--ready-file",
        default=None,
        metavar="PATH",
        help='once every replica listens, write {"addresses": ["host:port", ...]} to PATH (atomically)',
    )
    return p


def config_from_args(args: argparse.Namespace) -> FleetConfig:
    adapters = tuple(a.strip() for a in args.lora_adapters.split(",") if a.strip())
    return FleetConfig(
        replicas=args.replicas,
        host=args.host,
        base_port=args.base_port,
        model=args.model,
        lora_adapters=adapters,
        max_lora=args.max_lora,
        profile=args.profile,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        time_scale=args.time_scale,
        seed=args.seed,
        stream_interval=args.stream_interval,
    )


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
