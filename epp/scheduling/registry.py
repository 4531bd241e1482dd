"""Plugins registered by type name, and building the scheduler from the config.

A plugin module registers a factory with `@register("type-name", kind)`; the factory takes the plugin's
`params` (from the config) and a `PluginContext`, and must reject unknown parameters with a clear message.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from epp.config import Config, ConfigError
from epp.datastore.prefix_index import PrefixIndex
from epp.scheduling.scheduler import Scheduler

Kind = Literal["filter", "scorer", "picker"]


@dataclass(slots=True)
class PluginContext:
    config: Config
    prefix_index: PrefixIndex
    rng: random.Random


Factory = Callable[[Mapping[str, Any], PluginContext], Any]
_REGISTRY: dict[Kind, dict[str, Factory]] = {"filter": {}, "scorer": {}, "picker": {}}


def register(name: str, kind: Kind) -> Callable[[Factory], Factory]:
    def wrap(factory: Factory) -> Factory:
        _REGISTRY[kind][name] = factory
        return factory

    return wrap


def available() -> dict[str, list[str]]:
    _load_builtins()
    return {kind: sorted(names) for kind, names in _REGISTRY.items()}


def params_of(params: Mapping[str, Any], plugin: str, **defaults: Any) -> dict[str, Any]:
    """Merge `params` over `defaults`, rejecting unknown keys and values of the wrong type."""
    unknown = set(params) - set(defaults)
    if unknown:
        raise ConfigError(
            f"plugin '{plugin}': unknown parameter(s) {sorted(unknown)}; known: {sorted(defaults) or 'none'}"
        )
    merged = dict(defaults)
    for key, value in params.items():
        expected = type(defaults[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise ConfigError(
                f"plugin '{plugin}': parameter '{key}' must be {expected.__name__}, got {value!r}"
            )
        merged[key] = value
    return merged


def _load_builtins() -> None:
    # Imported for their registrations.
    from epp.scheduling.plugins import filters, pickers, prefix, scorers  # noqa: F401


def build(kind: Kind, type_name: str, params: Mapping[str, Any], ctx: PluginContext, where: str) -> Any:
    _load_builtins()
    factory = _REGISTRY[kind].get(type_name)
    if factory is None:
        raise ConfigError(
            f"{where}: unknown {kind} type '{type_name}'; available: {', '.join(sorted(_REGISTRY[kind]))}"
        )
    try:
        return factory(params, ctx)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def build_scheduler(ctx: PluginContext, *, time_plugins: bool = False) -> Scheduler:
    sched = ctx.config.scheduling
    filters = [
        build("filter", p.type, p.params, ctx, f"scheduling.filters[{i}]")
        for i, p in enumerate(sched.filters)
    ]
    scorers = [
        (build("scorer", p.type, p.params, ctx, f"scheduling.scorers[{i}]"), p.weight)
        for i, p in enumerate(sched.scorers)
    ]
    picker = build("picker", sched.picker.type, sched.picker.params, ctx, "scheduling.picker")
    return Scheduler(filters, scorers, picker, time_plugins=time_plugins)


def validate_plugins(config: Config) -> None:
    """Build the scheduler once, throw it away: unknown plugin types and bad parameters fail here."""
    build_scheduler(PluginContext(config, PrefixIndex(), random.Random()))
