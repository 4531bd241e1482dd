"""Plugins registered by type name, and building the scheduler from the config.

A plugin module registers a factory with `@register("type-name", kind, Params)`. `Params` is a frozen
dataclass whose fields (with their defaults) are the plugin's parameters; `build` checks the config's
`params` against it (unknown keys and wrong types are errors naming the entry and the key) and the dataclass's
`__post_init__` checks ranges. The factory then gets the validated `Params` and a `PluginContext`.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from epp.config import Config, ConfigError
from epp.datalayer.endpoints import EndpointPool
from epp.scheduling.scheduler import Scheduler

Kind = Literal["filter", "scorer", "picker"]


@dataclass(slots=True)
class PluginContext:
    """What a plugin may use besides its parameters: the whole config, the endpoint pool (plugins that keep
    per-endpoint state subscribe to its removals) and the scheduler's random source."""

    config: Config
    pool: EndpointPool
    rng: random.Random


@dataclass(frozen=True, slots=True)
class NoParams:
    """A plugin without parameters."""


@dataclass(frozen=True, slots=True)
class PluginType:
    name: str
    kind: Kind
    params: type
    factory: Callable[[Any, PluginContext], Any]

    @property
    def doc(self) -> str:
        """First paragraph of the plugin's docstring (the factory's return type, or the factory)."""
        target = self.factory.__annotations__.get("return")
        obj = self.factory.__globals__.get(target) if isinstance(target, str) else target
        text = (obj.__doc__ if obj is not None else None) or self.factory.__doc__ or ""
        return " ".join(text.strip().split("\n\n")[0].split())

    def defaults(self) -> dict[str, Any]:
        return {f.name: f.default for f in dataclasses.fields(self.params)}


_REGISTRY: dict[Kind, dict[str, PluginType]] = {"filter": {}, "scorer": {}, "picker": {}}


def register(name: str, kind: Kind, params: type = NoParams) -> Callable[[Callable], Callable]:
    def wrap(factory: Callable) -> Callable:
        _REGISTRY[kind][name] = PluginType(name, kind, params, factory)
        return factory

    return wrap


def _load_builtins() -> None:
    """Import every module under `epp.scheduling.plugins` (each registers its plugin)."""
    import epp.scheduling.plugins as package

    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)


def available() -> dict[str, list[str]]:
    _load_builtins()
    return {kind: sorted(names) for kind, names in _REGISTRY.items()}


def plugin_types() -> list[PluginType]:
    _load_builtins()
    return [plugin for names in _REGISTRY.values() for plugin in names.values()]


def params_of(params: Mapping[str, Any], plugin: str, **defaults: Any) -> dict[str, Any]:
    """Merge `params` over `defaults`, rejecting unknown keys and values of the wrong type (an int is
    accepted for a float; a bool is never a number)."""
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


def build(kind: Kind, type_name: str, params: Mapping[str, Any], ctx: PluginContext, where: str) -> Any:
    _load_builtins()
    plugin = _REGISTRY[kind].get(type_name)
    if plugin is None:
        raise ConfigError(
            f"{where}: unknown {kind} type '{type_name}'; available: {', '.join(sorted(_REGISTRY[kind]))}"
        )
    try:
        values = plugin.params(**params_of(params, type_name, **plugin.defaults()))
        return plugin.factory(values, ctx)
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
    build_scheduler(PluginContext(config, EndpointPool(), random.Random()))
