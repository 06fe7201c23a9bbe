"""Plugin discovery and loading: entry points in group ``waypost.sinks``, imported only when
config names their type, registered with a pluggy ``PluginManager`` for project ``waypost``."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from waypost import hookspecs
from waypost.errors import PluginError, UnknownSinkError
from waypost.sinks import Sink, SinkConfig

GROUP = "waypost.sinks"


@dataclass
class PluginInfo:
    """One entry point of group ``waypost.sinks``, as ``waypost plugins`` shows it."""

    sink_type: str
    module: str
    distribution: str
    version: str
    loaded: bool = False
    error: str | None = None
    sink_types: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    deprecated: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.sink_type,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "sink_types": self.sink_types,
            "hooks": self.hooks,
            "status": "error" if self.error else ("loaded" if self.loaded else "not loaded"),
            "error": self.error,
            "deprecated": self.deprecated is not None,
            "deprecation": self.deprecated,
        }


def _entry_points() -> dict[str, md.EntryPoint]:
    found: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return found


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or "unknown", dist.version or "unknown"


KNOWN_DISTRIBUTIONS = {"sql": "waypost-warehouse", "snowflake": "waypost-warehouse"}
"""Sink types whose distribution is not named after them."""


def install_hint(sink_type: str) -> str:
    dist = KNOWN_DISTRIBUTIONS.get(sink_type, f"waypost-{sink_type.replace('_', '-')}")
    return f"pip install {dist}"


class PluginManager:
    """Finds sink plugins and hook plugins, loads only what is asked for, keeps the errors."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("waypost")
        self.pm.add_hookspecs(hookspecs)
        self._eps: dict[str, md.EntryPoint] | None = None
        self._sinks: dict[str, type[Sink]] = {}
        self._infos: dict[str, PluginInfo] = {}
        self._modules: dict[str, types.ModuleType] = {}

    # --- discovery ----------------------------------------------------------------------------

    @property
    def entry_points(self) -> dict[str, md.EntryPoint]:
        if self._eps is None:
            self._eps = _entry_points()
        return self._eps

    def installed_types(self) -> list[str]:
        """Every sink type available: installed entry points and classes registered by hand."""
        return sorted(set(self.entry_points) | set(self._sinks))

    def info(self, sink_type: str) -> PluginInfo:
        if sink_type not in self._infos:
            ep = self.entry_points[sink_type]
            dist, version = _dist_of(ep)
            self._infos[sink_type] = PluginInfo(sink_type, ep.value, dist, version)
        return self._infos[sink_type]

    # --- loading ------------------------------------------------------------------------------

    def register_module(self, module: types.ModuleType | object, name: str | None = None) -> None:
        """Register a module or object of hook implementations (not through entry points)."""
        if self.pm.is_registered(module):
            return
        self.pm.register(module, name=name)
        self.pm.check_pending()
        self._collect_sinks(module)

    def register_sink(self, sink_class: type[Sink]) -> None:
        """Make a sink class available directly, e.g. for one test or an embedded sink."""
        _check_sink_class(sink_class, where=repr(sink_class))
        self._sinks[sink_class.type] = sink_class

    def _collect_sinks(self, module: object) -> list[str]:
        impl = getattr(module, "register_sinks", None)
        found: list[type[Sink]] = []
        if impl is not None:
            impl(register=found.append)
        for cls in found:
            _check_sink_class(cls, where=getattr(module, "__name__", repr(module)))
            self._sinks[cls.type] = cls
        return [cls.type for cls in found]

    def load_sink_type(self, sink_type: str, *, key: str | None = None) -> type[Sink]:
        """Import the plugin that provides ``sink_type`` (once) and return its sink class."""
        if sink_type in self._sinks:
            return self._sinks[sink_type]
        if sink_type not in self.entry_points:
            installed = ", ".join(self.installed_types()) or "none"
            raise UnknownSinkError(
                f"unknown sink type {sink_type!r}: installed types are {installed}; "
                f"{install_hint(sink_type)}",
                key=key,
            )
        ep = self.entry_points[sink_type]
        info = self.info(sink_type)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = self._modules.get(ep.value) or importlib.import_module(ep.value)
            for warning in caught:
                if issubclass(warning.category, DeprecationWarning):
                    info.deprecated = str(warning.message)
                warnings.warn_explicit(
                    warning.message, warning.category, warning.filename, warning.lineno
                )
            self._modules[ep.value] = module
            if not self.pm.is_registered(module):
                self.pm.register(module, name=ep.value)
                self.pm.check_pending()
            types_found = self._collect_sinks(module)
        except Exception as exc:  # a broken plugin must not break the others
            info.error = f"{type(exc).__name__}: {exc}"
            raise PluginError(
                f"error importing plugin {info.distribution} {info.version} "
                f"(module {ep.value}, sink type {sink_type!r}): {info.error}"
            ) from exc
        info.loaded = True
        info.sink_types = types_found
        info.hooks = sorted(hc.name for hc in self.pm.get_hookcallers(module) or [])
        if sink_type not in self._sinks:
            raise PluginError(
                f"plugin {info.distribution} {info.version} (module {ep.value}) is registered "
                f"for sink type {sink_type!r} but its register_sinks() did not register it"
            )
        cls = self._sinks[sink_type]
        if cls.deprecated and not info.deprecated:
            info.deprecated = cls.deprecated
        return cls

    def describe_all(self, *, load: bool = True) -> list[PluginInfo]:
        """Every installed plugin; with ``load`` each is imported to report its status."""
        out = []
        for sink_type in sorted(self.entry_points):
            info = self.info(sink_type)
            if load and not info.loaded and info.error is None:
                try:
                    self.load_sink_type(sink_type)
                except PluginError:
                    pass
                if sink_type in self._sinks and not info.loaded:
                    # Its module was loaded through another entry point of the same plugin.
                    sibling = next(
                        (i for i in self._infos.values() if i.module == info.module and i.loaded),
                        None,
                    )
                    info.loaded = True
                    if sibling is not None:
                        info.sink_types, info.hooks = sibling.sink_types, sibling.hooks
            out.append(info)
        return out

    def call_chain(self, hook_name: str, **kwargs: Any) -> Iterable[Any]:
        """Call each implementation of a hook in turn, yielding results (newest plugin first)."""
        caller = getattr(self.pm.hook, hook_name)
        for impl in reversed(caller.get_hookimpls()):
            yield impl.function(**{k: kwargs[k] for k in impl.argnames if k in kwargs})

    def has_impls(self, hook_name: str) -> bool:
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())


def _check_sink_class(cls: Any, *, where: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, Sink)):
        raise PluginError(f"{where}: register_sinks registered {cls!r}, not a waypost.Sink class")
    if not cls.type or not isinstance(cls.type, str):
        raise PluginError(f"{where}: sink class {cls.__name__} has no 'type' name")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, SinkConfig)):
        raise PluginError(
            f"{where}: {cls.__name__}.Config must be a subclass of waypost.SinkConfig"
        )
    if cls.send is Sink.send:
        raise PluginError(f"{where}: {cls.__name__} does not implement send()")
