"""The plugin mechanism: one pluggy ``PluginManager`` (project ``waypost``) and one entry-point
group, ``waypost.sinks``.

A plugin is a module of hook implementations. It comes from an entry point of the group (its
name is the plugin's name: for a sink plugin, the sink type), from ``telemetry.plugins`` in
config, or from ``Telemetry(plugins=[...])``. An entry point is imported only when something
names it: a configured sink type, an exporter under ``telemetry.metrics``, a ``waypost``
command, or ``waypost plugins`` (which imports them all). Sinks, metric exporters and CLI
commands all arrive through hooks (``register_sinks``, ``register_metric_exporters``,
``register_commands``), called through ``pm.hook`` so that wrappers, ``firstresult`` and
``pm.trace`` work; only ``waypost_before_send`` is a chain (each result feeds the next
implementation), and it refuses wrappers.

The entry-point groups ``waypost.commands`` and ``waypost.metrics`` still work, deprecated.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

from waypost import hookspecs
from waypost.errors import ConfigError, PluginError, UnknownSinkError
from waypost.logs import get_logger
from waypost.sinks import Sink, SinkConfig, SinkContext

if TYPE_CHECKING:
    from waypost.events import Event
    from waypost.metrics import MetricExporter, MetricRegistry
    from waypost.privacy.secrets import SecretHold

    ExporterFactory = Callable[[MetricRegistry, dict[str, Any]], MetricExporter]

log = get_logger(__name__)

GROUP = "waypost.sinks"
COMMANDS_GROUP = "waypost.commands"
"""Deprecated: command modules belong in ``waypost.sinks``."""
METRICS_GROUP = "waypost.metrics"
"""Deprecated: exporters are registered by the ``register_metric_exporters`` hook."""


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


def entry_points(group: str) -> dict[str, md.EntryPoint]:
    """The entry points of ``group`` by name (the first installed wins): the one scan."""
    found: dict[str, md.EntryPoint] = {}
    for ep in md.entry_points(group=group):
        found.setdefault(ep.name, ep)
    return found


def _entry_points() -> dict[str, md.EntryPoint]:
    # Of group waypost.sinks; waypost.testing's register_plugin fixture patches this one.
    return entry_points(GROUP)


def distribution_of(ep: md.EntryPoint) -> tuple[str, str]:
    """The name and version of the distribution that installed ``ep``."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", "unknown"
    return dist.metadata["Name"] or "unknown", dist.version or "unknown"


def deprecated_group(group: str) -> str:
    """The warning for an entry point of a deprecated group."""
    return (
        f"the entry-point group {group!r} is deprecated and will be removed: declare the "
        f"module in group {GROUP!r} instead; it registers its "
        + ("commands with the register_commands hook" if group == COMMANDS_GROUP else
           "exporters with the register_metric_exporters hook")
    )  # fmt: skip


KNOWN_DISTRIBUTIONS = {"sql": "waypost-warehouse", "snowflake": "waypost-warehouse"}
"""Sink types whose distribution is not named after them."""


def install_hint(sink_type: str) -> str:
    dist = KNOWN_DISTRIBUTIONS.get(sink_type, f"waypost-{sink_type.replace('_', '-')}")
    return f"pip install {dist}"


class PluginManager:
    """Finds plugins, loads only what is asked for, keeps the errors."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("waypost")
        self.pm.add_hookspecs(hookspecs)
        self._eps: dict[str, md.EntryPoint] | None = None
        self._sinks: dict[str, type[Sink]] = {}
        self._infos: dict[str, PluginInfo] = {}
        self._modules: dict[str, types.ModuleType] = {}

    @property
    def hook(self) -> pluggy.HookRelay:
        """``pm.hook``: call a hook on every registered plugin."""
        return self.pm.hook

    # --- discovery ----------------------------------------------------------------------------

    @property
    def entry_points(self) -> dict[str, md.EntryPoint]:
        if self._eps is None:
            self._eps = _entry_points()
        return self._eps

    def installed_types(self) -> list[str]:
        """Every sink type available: installed entry points and classes registered by hand."""
        return sorted(set(self.entry_points) | set(self._sinks))

    def info(self, name: str) -> PluginInfo:
        if name not in self._infos:
            ep = self.entry_points[name]
            dist, version = distribution_of(ep)
            self._infos[name] = PluginInfo(name, ep.value, dist, version)
        return self._infos[name]

    # --- registering --------------------------------------------------------------------------

    def register_module(self, module: types.ModuleType | object, name: str | None = None) -> None:
        """Register a module or object of hook implementations (not through entry points)."""
        if not self.pm.is_registered(module):
            self._register(module, name, where=getattr(module, "__name__", repr(module)))

    def register_sink(self, sink_class: type[Sink]) -> None:
        """Make a sink class available directly, e.g. for one test or an embedded sink."""
        _check_sink_class(sink_class, where=repr(sink_class))
        self._sinks[sink_class.type] = sink_class

    def _register(self, plugin: object, name: str | None, *, where: str) -> list[str]:
        """Register ``plugin``, check it, and collect its sink classes (their types)."""
        try:
            self.pm.register(plugin, name=name)  # runs its register_commands in the CLI
            self.pm.check_pending()
            for impl in self.pm.hook.waypost_before_send.get_hookimpls():
                if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                    raise PluginError(
                        f"{where}: waypost_before_send cannot be a wrapper "
                        "(hookimpl(wrapper=True) or hookwrapper=True): each implementation's "
                        "result feeds the next; implement it as a plain hook"
                    )
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            found: list[type[Sink]] = []
            self.pm.subset_hook_caller("register_sinks", others)(register=found.append)
            for cls in found:
                _check_sink_class(cls, where=where)
        except Exception:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            raise
        for cls in found:
            self._sinks[cls.type] = cls
        return [cls.type for cls in found]

    def load_plugin(self, name: str) -> types.ModuleType:
        """Import the entry point ``name`` of group ``waypost.sinks`` (once) and register it.
        Raises :class:`PluginError` naming the distribution when it cannot be imported."""
        ep = self.entry_points[name]
        info = self.info(name)
        if ep.value in self._modules:
            module = self._modules[ep.value]
        else:
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    module = importlib.import_module(ep.value)
                for warning in caught:
                    if issubclass(warning.category, DeprecationWarning):
                        info.deprecated = str(warning.message)
                    warnings.warn_explicit(
                        warning.message, warning.category, warning.filename, warning.lineno
                    )
                types_found = (
                    [] if self.pm.is_registered(module)
                    else self._register(module, ep.value, where=f"{info.distribution} ({ep.value})")
                )  # fmt: skip
            except Exception as exc:  # a broken plugin must not break the others
                info.error = f"{type(exc).__name__}: {exc}"
                raise PluginError(
                    f"error importing plugin {info.distribution} {info.version} "
                    f"(module {ep.value}, sink type {name!r}): {info.error}"
                ) from exc
            self._modules[ep.value] = module
            info.sink_types = types_found
        for sibling in self._infos.values():  # several entry points may name one module
            if sibling.module == ep.value and sibling is not info and sibling.loaded:
                info.sink_types = sibling.sink_types
        info.loaded = True
        info.hooks = sorted(hc.name for hc in self.pm.get_hookcallers(module) or [])
        return module

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
        self.load_plugin(sink_type)
        info = self.info(sink_type)
        if sink_type not in self._sinks:
            raise PluginError(
                f"plugin {info.distribution} {info.version} (module {info.module}) is registered "
                f"for sink type {sink_type!r} but its register_sinks() did not register it"
            )
        cls = self._sinks[sink_type]
        if cls.deprecated and not info.deprecated:
            info.deprecated = cls.deprecated
        return cls

    def load_all(self, *, report: Callable[[str, PluginError], None] | None = None) -> None:
        """Import every entry point of the group; ``report`` hears of each one that fails."""
        for name in sorted(self.entry_points):
            info = self.info(name)
            if info.loaded or info.error is not None:
                continue
            try:
                self.load_plugin(name)
            except PluginError as exc:
                if report is not None:
                    report(name, exc)

    def describe_all(self, *, load: bool = True) -> list[PluginInfo]:
        """Every installed plugin; with ``load`` each is imported to report its status."""
        if load:
            self.load_all()
        for name in sorted(self.entry_points):
            info = self.info(name)
            cls = self._sinks.get(name)
            if cls is not None and cls.deprecated and not info.deprecated:
                info.deprecated = cls.deprecated
        return [self.info(name) for name in sorted(self.entry_points)]

    # --- what plugins contribute --------------------------------------------------------------

    def make_sinks(
        self,
        specs: Mapping[str, Mapping[str, Any]],
        *,
        context: SinkContext,
        env: Mapping[str, str],
        config_file: str | None,
        strict: bool,
        tolerant: bool = False,
        notes: list[str] | None = None,
        secrets: SecretHold | None = None,
    ) -> tuple[dict[str, Sink], dict[str, tuple[str, str]]]:
        """The sinks of ``telemetry.sinks`` (``specs``: name -> settings with their ``type``),
        only their types' plugins imported; and for each sink that cannot be made, its type and
        the error (logged). In strict mode the first error raises, unless ``tolerant``
        (inspection: ``waypost status`` shows a sink whose plugin is missing or broken, or whose
        variable is not set in this shell, as ``error`` with its reason). Remarks on the values
        (a YAML 1.1 word read as the field wants) are added to ``notes``. The secrets of the
        settings are held by ``secrets`` (the owner's, released when it shuts down; for good
        without one), and each sink's by its own :attr:`~waypost.Sink.masker`."""
        from pydantic import ValidationError

        from waypost.config import conform, env_origins, expand, validation_error
        from waypost.privacy.secrets import SANITISER, secret_values

        known = secrets.add if secrets is not None else SANITISER.add

        made: dict[str, Sink] = {}
        errors: dict[str, tuple[str, str]] = {}
        for name, given in specs.items():
            spec = dict(given)
            sink_type = str(spec.pop("type"))
            key = f"telemetry.sinks.{name}"
            try:
                spec = expand(spec, env, key)
                known(secret_values(spec))  # before validation: its errors may quote a value
                cls = self.load_sink_type(sink_type, key=key)
                # Values by the sink's own fields: region: no is a word, api_key: 0123 text.
                found: list[str] = []
                origins = env_origins(spec, key)
                spec = conform(cls.Config, spec, key, found)
                for note in found:
                    if notes is not None and note not in notes:
                        notes.append(note)
                        log.warning("waypost: %s", note)
                try:
                    sink_config = cls.Config.model_validate(spec)
                except ValidationError as exc:
                    raise validation_error(
                        exc, source=config_file, prefix=key, origins=origins
                    ) from None
                known(secret_values(sink_config))  # its constructor's errors may quote one
                sink = cls(name, sink_config, context)
                _ = sink.masker  # the sink's secrets known from now on, as long as it lives
                made[name] = sink
            except KeyboardInterrupt:
                raise  # the user's, on the caller's thread
            except BaseException as exc:  # SystemExit or any other, from a plugin's code
                if not isinstance(exc, (ConfigError, PluginError)):
                    exc = PluginError(
                        f"sink {name!r} (type {sink_type!r}) could not be made: "
                        f"{type(exc).__name__}: {exc}"
                    )
                if isinstance(exc, ConfigError) and exc.source is None:
                    exc = type(exc)(exc.reason, source=config_file, key=exc.key)
                if strict and not tolerant:
                    raise exc from None
                errors[name] = (sink_type, str(exc))
                log.error("waypost: sink %r is off: %s", name, exc)
        return made, errors

    def metric_exporters(self) -> dict[str, ExporterFactory]:
        """The metric exporters the registered plugins offer, by name."""
        found: dict[str, ExporterFactory] = {}
        self.pm.hook.register_metric_exporters(register=found.__setitem__)
        return found

    def metric_exporter(self, name: str) -> ExporterFactory | None:
        """The exporter ``name``: from a registered plugin, else from the plugin of that name
        in ``waypost.sinks`` (imported now). None when no plugin offers it."""
        found = self.metric_exporters().get(name)
        if found is None and name in self.entry_points and not self.info(name).loaded:
            self.load_plugin(name)
            found = self.metric_exporters().get(name)
        return found

    def before_send_chain(self) -> list[Callable[[Event], Any]]:
        """The ``waypost_before_send`` implementations in calling order (newest plugin first):
        the one hook whose result feeds the next implementation."""
        chain: list[Callable[[Event], Any]] = []
        for impl in reversed(self.pm.hook.waypost_before_send.get_hookimpls()):
            function = impl.function
            chain.append(function if impl.argnames else _ignoring_event(function))
        return chain

    def call_each(
        self, hook_name: str, on_error: Callable[[str, Exception], None], **kwargs: Any
    ) -> Iterator[tuple[str, list[Any]]]:
        """Call a hook plugin by plugin (newest first), each call through ``pm.hook`` with the
        wrappers around it, yielding ``(plugin name, results)``: a plugin whose implementation
        raises is handed to ``on_error`` and skipped, and the others still run. For the hooks
        read at start, where one broken plugin must not take the others' parts with it."""
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        plain = [i for i in impls if not (i.wrapper or i.hookwrapper)]
        if not plain:
            if impls:  # only wrappers: one call, as pm.hook would make it
                yield "", getattr(self.pm.hook, hook_name)(**kwargs)
            return
        for impl in reversed(plain):
            others = [i.plugin for i in plain if i.plugin is not impl.plugin]
            try:
                results = self.pm.subset_hook_caller(hook_name, others)(**kwargs)
            except Exception as exc:
                on_error(impl.plugin_name, exc)
                continue
            yield impl.plugin_name, results

    def has_impls(self, hook_name: str) -> bool:
        return bool(getattr(self.pm.hook, hook_name).get_hookimpls())

    def call_chain(self, hook_name: str, **kwargs: Any) -> Iterable[Any]:
        """Deprecated: call ``plugins.hook.<name>(...)`` (it returns the results)."""
        warnings.warn(
            "PluginManager.call_chain is deprecated: call plugins.hook.<name>(...) instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return list(getattr(self.pm.hook, hook_name)(**kwargs))


def _ignoring_event(function: Callable[[], Any]) -> Callable[[Event], Any]:
    return lambda event: function()


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


# --- one instance's plugins ----------------------------------------------------------------------


def import_beside(
    name: str,
    config_file: str | None,
    load: Callable[[str], types.ModuleType] = importlib.import_module,
) -> types.ModuleType:
    """Import a module the config names; one that is not on the path is looked for beside the
    config file too, as ``waypost manifest`` looks for ``schemas``: so the CLI finds an
    application's own plugin module when run from anywhere. Only that module (or package) is
    taken from there: ``sys.path`` is left as it was, so nothing else beside the config file
    shadows or adds to what the process imports."""
    try:
        return load(name)
    except ModuleNotFoundError as exc:
        top = name.partition(".")[0]
        if config_file in (None, "<config>") or exc.name != top:
            raise
        import importlib.machinery
        import importlib.util
        import os
        import sys

        beside = os.path.dirname(os.path.abspath(str(config_file)))
        spec = importlib.machinery.PathFinder.find_spec(top, [beside])
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules[top] = module  # as an import does: the module may import itself
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(top, None)
            raise
        return load(name)  # a package's submodules are found through its __path__


def plugin_label(plugin: object) -> str:
    """A readable name for a plugin given in code: its module's name, or its class's."""
    name = getattr(plugin, "__name__", None)
    if isinstance(name, str):
        return name
    kind = type(plugin)
    return f"{kind.__module__}.{kind.__qualname__}"


class PluginLoader:
    """Registers the plugins one instance is given in code or finds named in
    ``telemetry.plugins``, and keeps what failed (``errors``, by plugin, with the reason: what
    ``status()`` shows as ``plugin_errors``)."""

    def __init__(self, plugins: PluginManager, *, strict: bool, config_file: str | None) -> None:
        self.plugins = plugins
        self.strict = strict
        self.config_file = config_file
        self.errors: dict[str, str] = {}

    def register_all(
        self,
        plugins: Iterable[object],
        module_names: Iterable[str],
        sink_classes: Iterable[type[Sink]],
        *,
        inspecting: bool,
    ) -> None:
        """Register the plugins given in code, the modules ``telemetry.plugins`` names, and the
        sink classes given in code, in that order."""
        for plugin in plugins:
            self.register(plugin)
        for module_name in module_names:
            self.register_named(module_name, inspecting=inspecting)
        for sink_class in sink_classes:
            self.register_sink(sink_class)

    def register_named(self, module_name: str, *, inspecting: bool) -> None:
        """Import and register a module of ``telemetry.plugins``. A failure raises in strict
        mode, except for an instance that only inspects (``start=False``: the CLI), where it is
        recorded in ``errors``: the operator must still see and switch off telemetry."""
        try:
            module = import_beside(module_name, self.config_file)
        except Exception as exc:
            self.failed(
                module_name,
                PluginError(f"error importing plugin {module_name!r}: {type(exc).__name__}: {exc}"),
                exc,
                inspecting=inspecting,
            )
            return
        self.register(module, module_name, inspecting=inspecting)

    def register(
        self, plugin: object, name: str | None = None, *, inspecting: bool = False
    ) -> None:
        """Register hook implementations given in code or named in ``telemetry.plugins``; one
        that cannot be registered (its ``register_sinks`` raises, a misspelt hook) is reported
        and its sinks are off."""
        label = name or plugin_label(plugin)
        if name is None and self.plugins.pm.get_plugin(label) is not None:
            label = f"{label}#{id(plugin):x}"  # two instances of one class
        try:
            self.plugins.register_module(plugin, name=label)
        except Exception as exc:
            error = exc if isinstance(exc, PluginError) else PluginError(
                f"plugin {label!r} could not be registered: {type(exc).__name__}: {exc}",
                plugin=label)  # fmt: skip
            self.failed(label, error, exc, inspecting=inspecting)

    def register_sink(self, sink_class: type[Sink]) -> None:
        """Make a sink class given in code available; one that is not a sink is reported."""
        try:
            self.plugins.register_sink(sink_class)
        except PluginError as exc:
            self.failed(repr(sink_class), exc)

    def failed(self, plugin: str, error: PluginError, cause: BaseException | None = None,
               consequence: str = "", *, inspecting: bool = False) -> None:  # fmt: skip
        """A plugin failed: raise at once in strict mode (unless the instance only inspects:
        the CLI); otherwise report it in ``errors`` with one log line, and go on without that
        part."""
        if self.strict and not inspecting:
            raise error from cause
        message = f"{error}{consequence}"
        previous = self.errors.get(plugin)
        self.errors[plugin] = f"{previous}; {message}" if previous else message
        log.error("waypost: %s", message)

    def hook_failed(self, plugin: str, what: str, exc: Exception) -> None:
        """``what`` went wrong with a hook of ``plugin`` (``waypost_context raised``)."""
        self.failed(
            plugin,
            PluginError(f"plugin {plugin!r}: {what} {type(exc).__name__}: {exc}", plugin=plugin),
            exc,
            consequence=" (what it adds is left out)",
        )
