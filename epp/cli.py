"""`epp` command line: serve (the picker), explain, endpoints, plugins, check-config; and, when the lab
package (`epp_lab`: simulator and demo, not part of the picker) is installed, sim and demo."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from epp.config import ConfigError, load_config
from epp.scheduling.registry import validate_plugins


def _serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Nested config overrides from the flags that were given (flags win over the file)."""
    server: dict[str, Any] = {}
    for flag, key in (
        ("host", "host"),
        ("extproc_port", "extproc_port"),
        ("health_port", "health_port"),
        ("admin_port", "admin_port"),
        ("metrics_port", "metrics_port"),
        ("grace_period", "grace_period_s"),
        ("log_level", "log_level"),
    ):
        if getattr(args, flag) is not None:
            server[key] = getattr(args, flag)
    tls: dict[str, Any] = {}
    if args.plaintext:
        tls["enabled"] = False
    if args.tls_cert or args.tls_key:
        tls.update(cert_file=args.tls_cert, key_file=args.tls_key)
    if tls:
        server["tls"] = tls
    out: dict[str, Any] = {"server": server} if server else {}
    if args.endpoints is not None:
        out["pool"] = {
            "endpoints": [
                {"address": a, "engine": args.engine} for a in args.endpoints.split(",") if a.strip()
            ]
        }
    limits: dict[str, Any] = {}
    if args.fallback_endpoints is not None:
        limits["fallback_endpoints"] = args.fallback_endpoints
    if args.max_body_bytes is not None:
        limits["max_body_bytes"] = args.max_body_bytes
    if limits:
        out["limits"] = limits
    sched: dict[str, Any] = {}
    if args.seed is not None:
        sched["seed"] = args.seed
    if args.scrape_interval is not None:
        sched["scrape"] = {"interval_s": args.scrape_interval}
    if sched:
        out["scheduling"] = sched
    return out


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the endpoint picker (ext_proc gRPC server)",
        description="Run the endpoint picker. Flags override the config file, which overrides the "
        "defaults (epp/config.py).",
    )
    p.add_argument("--config", "-c", help="YAML config file (default: the built-in defaults)")
    p.add_argument("--host", help="address of the ext_proc and health ports (default 127.0.0.1)")
    p.add_argument("--extproc-port", type=int, help="ext_proc gRPC port (default 9002; 0 = any free port)")
    p.add_argument("--health-port", type=int, help="gRPC health port (default 9003)")
    p.add_argument("--admin-port", type=int, help="admin API port, on server.admin_host (default 9004)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default 9090)")
    p.add_argument("--plaintext", action="store_true", help="serve ext_proc without TLS (default: TLS)")
    p.add_argument("--tls-cert", help="PEM certificate for ext_proc TLS (default: self-signed at start-up)")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--endpoints", help="static pool, comma-separated ip:port list (replaces pool.endpoints)")
    p.add_argument(
        "--engine", default="vllm", help="engine of --endpoints: vllm, sglang, trtllm-serve, triton-trtllm"
    )
    p.add_argument(
        "--fallback-endpoints", type=int, help="fallback endpoints after the chosen one (default 0)"
    )
    p.add_argument("--max-body-bytes", type=int, help="largest request body accepted (default 16 MiB)")
    p.add_argument(
        "--grace-period", type=float, help="seconds in-flight streams get on shutdown (default 10)"
    )
    p.add_argument("--scrape-interval", type=float, help="metrics scrape interval in seconds (default 0.05)")
    p.add_argument("--seed", type=int, help="seed for random tie-breaks and weighted rewrites")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default INFO")
    p.add_argument("--ready-file", help="write the bound ports as JSON here once serving (for scripts)")


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, _serve_overrides(args))
        validate_plugins(config)
    except ConfigError as err:
        print(f"epp: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.server.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from epp.server import run

    return run(config, ready_file=args.ready_file)


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
        validate_plugins(config)
    except ConfigError as err:
        print(f"epp: {err}", file=sys.stderr)
        return 2
    print(f"{args.config or 'built-in defaults'}: valid ({len(config.pool.endpoints)} endpoints)")
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from epp.scheduling import registry

    for kind, names in registry.available().items():
        print(f"{kind}s: {', '.join(names)}")
    if args.verbose:
        for plugin in sorted(registry.plugin_types(), key=lambda p: (p.kind, p.name)):
            defaults = ", ".join(f"{k}={v!r}" for k, v in plugin.defaults().items()) or "no parameters"
            print(f"\n{plugin.kind} {plugin.name} ({defaults})\n  {plugin.doc}")
    return 0


def _lab(module: str, argv: list[str]) -> int:
    """Run a lab command (simulator, demo) if the lab package is installed; it is not part of the picker."""
    import importlib

    try:
        lab = importlib.import_module(f"epp_lab.{module}")
    except ModuleNotFoundError as err:
        if err.name is None or not err.name.startswith("epp_lab"):
            raise
        print(
            "epp: the lab tools (simulator, demo) are not installed; from a checkout run ./dev setup "
            "(or pip install -e lab/)",
            file=sys.stderr,
        )
        return 2
    return int(lab.main(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Subcommands with their own parsers get the rest of the line untouched.
    if argv and argv[0] == "sim":
        return _lab("sim.cli", argv[1:])
    if argv and argv[0] == "demo":
        return _lab("demo", argv[1:])
    if argv and argv[0] in ("explain", "endpoints"):
        from epp.admin.client import main as admin_main

        return admin_main(argv)

    parser = argparse.ArgumentParser(
        prog="epp",
        description="Endpoint picker for LLM inference behind Envoy (ext_proc). Subcommands: serve, sim, "
        "demo, explain, endpoints, plugins, check-config; `epp SUBCOMMAND --help` for each.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    sub.add_parser("sim", help="run a simulated vLLM fleet (see `epp sim --help`)")
    sub.add_parser("demo", help="round-robin vs the picker on a simulated fleet (see `epp demo --help`)")
    sub.add_parser("explain", help="explain where a request would go and why (see `epp explain --help`)")
    sub.add_parser("endpoints", help="list endpoints with metrics and in-flight counts")
    plugins = sub.add_parser("plugins", help="list the registered scheduling plugins")
    plugins.add_argument("-v", "--verbose", action="store_true", help="with parameters and formulas")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config", nargs="?", help="YAML config file (default: embedded defaults)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _cmd_serve(args)
    if args.command == "plugins":
        return _cmd_plugins(args)
    if args.command == "check-config":
        return _cmd_check_config(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
