"""Start and stop real vLLM (CPU) replicas of the tiny model.

    env = RealEngineEnv.find()                           # .venv-vllm and .cache/realengine (or the env vars)
    async with RealFleet(env, replicas=2) as fleet:
        fleet.addresses                                  # ["127.0.0.1:P", ...]
        fleet.kv_endpoints                               # ["tcp://127.0.0.1:P+1", ...]

Each replica is `python -m vllm.entrypoints.openai.api_server` in its own process group (a `procs.Child`,
stopped by group: vLLM's EngineCore is a child process), ready when `/v1/models` answers 200. What makes
it work on 2 shared cores, and why (facts measured on this kind of machine):

- `OMP_NUM_THREADS=1` (several replicas spin-waiting on OpenMP collapse latency),
  `VLLM_ENABLE_V1_MULTIPROCESSING=0` (no extra worker process, start-up ~20 s instead of 35-97 s);
  offline flags (nothing may be fetched); `PYTHONHASHSEED` and `VLLM_CPU_KVCACHE_SPACE` unset (the first
  changes every block hash, the second overrides `--kv-cache-memory-bytes`).
- Ports: HTTP port P below the kernel's ephemeral range (nothing else grabs it between our check and vLLM's
  bind); KV events on P + 1, bound as `tcp://[::ffff:127.0.0.1]:P+1` (vLLM binds only endpoints with `*`
  or `::`; this IPv4-mapped form binds 127.0.0.1 alone; `tcp://127.0.0.1:P` would make vLLM connect);
  their replay socket (ROUTER, vLLM keeps the last 10,000 messages) on P + 2.
- `--load-format auto` loads the seeded weights of `build_model.py`, so every replica has the same weights
  and greedy outputs are equal across replicas. Block size is 128 tokens on CPU; 1 KiB of KV per token,
  so `kv_cache_bytes` = blocks x 128 KiB (at least `max_model_len` tokens).
- LoRA adapters are given by absolute path (vLLM puts the path into LoRA block hashes), and can be loaded
  at run time (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`, `POST /v1/load_lora_adapter`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epp_lab.procs import Child

REPO = Path(__file__).resolve().parents[3]
BLOCK_SIZE = 128  # vLLM's block size on CPU
KV_BYTES_PER_BLOCK = 128 * 1024  # the tiny model: 2 layers x 2 KV heads x 64 x (K, V) x 2 bytes x 128 tokens
SERVED_NAME = "base"
KV_PORT_OFFSET = 1  # KV-event publisher at the HTTP port + 1
REPLAY_PORT_OFFSET = 1  # its replay socket (ROUTER, the last 10,000 messages) at the publisher's port + 1
TOPIC = "kv-events"

ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "TOKENIZERS_PARALLELISM": "false",
}
UNSET = ("PYTHONHASHSEED", "VLLM_CPU_KVCACHE_SPACE", "CUDA_VISIBLE_DEVICES")


class RealEngineMissing(RuntimeError):
    """The vLLM venv or the tiny model is not there (`./dev realengine` makes them)."""


@dataclass(frozen=True, slots=True)
class RealEngineEnv:
    """Where vLLM's Python and the built model are."""

    python: Path
    models: Path  # build_model.py's OUT_DIR: model/, loras/lora-N/, BUILD_INFO.json

    @property
    def model_dir(self) -> Path:
        return self.models / "model"

    def lora(self, name: str) -> Path:
        return (self.models / "loras" / name).resolve()

    @classmethod
    def find(cls) -> RealEngineEnv:
        python = Path(os.environ.get("EPP_REALENGINE_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
        models = Path(os.environ.get("EPP_REALENGINE_MODELS") or REPO / ".cache" / "realengine")
        if not python.exists() or not (models / "BUILD_INFO.json").exists():
            raise RealEngineMissing(
                f"no vLLM environment ({python}) or tiny model ({models}): run ./dev realengine first"
            )
        return cls(python, models)


@dataclass(slots=True)
class EngineOptions:
    """One replica's settings (the defaults suit the test tier: a 128-block cache, evictions are cheap)."""

    kv_cache_blocks: int = 128
    max_model_len: int = 4096
    max_num_seqs: int = 16
    max_loras: int = 2
    max_lora_rank: int = 8
    lora_modules: dict[str, Path] = field(default_factory=dict)  # preloaded adapters
    kv_events: bool = True
    dev_mode: bool = False  # VLLM_SERVER_DEV_MODE=1: POST /reset_prefix_cache
    extra_args: tuple[str, ...] = ()


def vllm_argv(env: RealEngineEnv, options: EngineOptions, port: int) -> list[str]:
    argv = [
        "env", *(f"--unset={name}" for name in UNSET),
        str(env.python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(env.model_dir.resolve()), "--served-model-name", SERVED_NAME,
        "--load-format", "auto", "--dtype", "bfloat16",
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--max-model-len", str(options.max_model_len), "--max-num-seqs", str(options.max_num_seqs),
        "--kv-cache-memory-bytes", str(options.kv_cache_blocks * KV_BYTES_PER_BLOCK),
        "--enable-lora", "--max-loras", str(options.max_loras), "--max-lora-rank", str(options.max_lora_rank),
    ]  # fmt: skip
    if options.lora_modules:
        argv += ["--lora-modules", *(f"{k}={Path(v).resolve()}" for k, v in options.lora_modules.items())]
    if options.kv_events:
        config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://[::ffff:127.0.0.1]:{port + KV_PORT_OFFSET}",
            "topic": TOPIC,
            "replay_endpoint": f"tcp://127.0.0.1:{port + KV_PORT_OFFSET + REPLAY_PORT_OFFSET}",
        }
        argv += ["--kv-events-config", json.dumps(config)]
    return argv + list(options.extra_args)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int, rng: random.Random | None = None) -> list[int]:
    """`count` HTTP ports P (each with P + 1 and P + 2 free too: events, replay) below the ephemeral range,
    not overlapping."""
    rng = rng or random.Random()
    high = max(20_003, _ephemeral_low() - 3)
    taken: set[int] = set()
    out: list[int] = []
    for _ in range(2000):
        if len(out) == count:
            break
        port = rng.randrange(20_000, high)
        trio = {port, port + 1, port + 2}
        if trio & taken or not all(_free(p) for p in trio):
            continue
        out.append(port)
        taken.update(range(port - 2, port + 3))
    if len(out) < count:
        raise RuntimeError(f"no {count} free port pairs below the ephemeral range")
    return out


class RealFleet:
    """N real vLLM replicas, started together; `async with`, or `start()` / `stop()`."""

    def __init__(
        self,
        env: RealEngineEnv,
        replicas: int = 2,
        options: EngineOptions | None = None,
        *,
        log_dir: Path | None = None,
        timeout: float = 600.0,
    ) -> None:
        self.env = env
        self.options = options or EngineOptions()
        self.ports = pick_ports(replicas)
        self.log_dir = log_dir
        extra = {"VLLM_SERVER_DEV_MODE": "1"} if self.options.dev_mode else {}
        self.children = [
            Child(
                f"vllm-{i}",
                vllm_argv(env, self.options, port),
                ready_url=f"http://127.0.0.1:{port}/v1/models",
                env={**ENV, **extra},
                log=(log_dir / f"vllm-{i}.log") if log_dir else None,
                timeout=timeout,
                stop_timeout=20.0,
            )
            for i, port in enumerate(self.ports)
        ]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    @property
    def kv_endpoints(self) -> list[str]:
        return [f"tcp://127.0.0.1:{p + KV_PORT_OFFSET}" for p in self.ports]

    async def start(self) -> None:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        results = await asyncio.gather(*(c.start() for c in self.children), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop()
            raise errors[0]

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.children))

    async def __aenter__(self) -> RealFleet:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def model_block_info(env: RealEngineEnv) -> dict[str, Any]:
    """BUILD_INFO.json of the tiny model (versions, file hashes)."""
    info: dict[str, Any] = json.loads((env.models / "BUILD_INFO.json").read_text())
    return info
