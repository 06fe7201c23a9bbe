"""Starting an instance: its config loaded (a bad one leaves telemetry off, with the reason),
its data dir found, consent decided, and what runs while telemetry is on made: the data dir and
instance id, the first-run notice, the sinks, the pipeline; and what a start leaves behind for
the CLI (the installation record)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from waypost import config as _config
from waypost import datadir
from waypost.config import TelemetryConfig
from waypost.control import ControlState
from waypost.delivery.backoff import Backoff
from waypost.delivery.outbox import Outbox
from waypost.delivery.pipeline import Pipeline
from waypost.delivery.upkeep import OutboxUpkeep
from waypost.errors import ConfigError, PluginError, WaypostError
from waypost.gate import Gate
from waypost.instance import Instance
from waypost.logs import get_logger
from waypost.privacy import Decision, StoredConsent, notice, resolve_consent, secrets
from waypost.sinks import Sink, SinkConfig, SinkContext

if TYPE_CHECKING:
    from waypost.heartbeat import Schedules
    from waypost.plugins import PluginLoader, PluginManager
    from waypost.privacy.secrets import SecretHold
    from waypost.status import LogOnce

log = get_logger(__name__)

ConfigSource: TypeAlias = str | os.PathLike[str] | Mapping[str, Any] | TelemetryConfig | None
"""What ``Telemetry(config=...)`` takes."""


@dataclass
class Loaded:
    """A config as loaded: ``error`` says why it could not be (then ``config`` is off)."""

    config: TelemetryConfig
    file: str | None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    """Settings that were ignored (a ``WAYPOST_...`` variable naming no setting)."""
    sink_sources: dict[str, Any] = field(default_factory=dict)
    """Each sink's settings as written (see :func:`waypost.config.load`)."""
    failure: str | None = None
    """Why loading failed when it is not the config's fault (a bug in waypost): telemetry is
    off (rule ``error``), and ``error`` stays None."""


def _is_config_error(exc: Exception) -> bool:
    """Whether ``exc`` says the config is wrong (invalid, or a file that cannot be read or
    parsed), not that waypost's own code failed."""
    import yaml
    from pydantic import ValidationError

    try:
        from tomllib import TOMLDecodeError
    except ImportError:  # Python 3.10
        from tomli import TOMLDecodeError
    problems = (ConfigError, OSError, UnicodeError, yaml.YAMLError, TOMLDecodeError)
    return isinstance(exc, (*problems, ValidationError))


def load_config(
    config: ConfigSource,
    env: Mapping[str, str],
    *,
    strict: bool | None,
    debug: bool | None,
    hold: SecretHold,
) -> Loaded:
    """Load the config (None: the ``WAYPOST_CONFIG`` file or a ``telemetry.yml`` here, if
    any); its literal secrets go to ``hold``. One that cannot be loaded raises if ``strict``,
    else comes back off, with the reason (logged once): ``error`` when the config is at fault,
    ``failure`` (logged with its traceback) when waypost's own code failed."""
    overrides: dict[str, Any] = {}
    if strict is not None:
        overrides["strict"] = strict
    if debug is not None:
        overrides["debug"] = debug
    if config is None:
        found = _config.find_config(env)
        config = found if found is not None else None
    secrets.guard_loggers()
    loaded = Loaded(TelemetryConfig(enabled=False, strict=False), None)
    try:
        loaded.config, loaded.file = _config.load(
            config,
            env,
            overrides=overrides,
            notes=loaded.warnings,
            sink_sources=loaded.sink_sources,
        )
        hold.add_config(loaded.config)  # literal secrets; ${...} when sinks are made
    except Exception as exc:
        path = str(config) if isinstance(config, (str, os.PathLike)) else None
        loaded.config, loaded.file = TelemetryConfig(enabled=False, strict=False), path
        if not _is_config_error(exc):  # a bug: not to be shown as the operator's mistake
            if strict:
                raise
            loaded.failure = secrets.sanitise(
                f"the configuration could not be loaded (a fault in waypost, not in the "
                f"configuration): {type(exc).__name__}: {exc}"
            )
            log.error("waypost: telemetry is off: %s", loaded.failure, exc_info=True)
            return loaded
        if not isinstance(exc, ConfigError):  # a file or parser error the reader let through
            exc = ConfigError(f"cannot be loaded: {type(exc).__name__}: {exc}", source=path)
        if strict:
            raise exc from None
        loaded.error = str(exc)
        log.error("waypost: telemetry is off: %s", exc)
    for note in loaded.warnings:
        log.warning("waypost: %s", note)
    return loaded


def locate(
    loaded: Loaded,
    *,
    app: str | None,
    data_dir: str | os.PathLike[str] | None,
    env: Mapping[str, str],
) -> datadir.Location:
    """The data dir (see :func:`waypost.datadir.locate`). One that cannot be located raises in
    strict mode; otherwise the default serves and ``loaded.error`` says why (telemetry off)."""
    cfg = loaded.config
    try:
        return datadir.locate(
            app=app, data_dir=data_dir, config=cfg, config_file=loaded.file, env=env
        )
    except Exception as exc:  # e.g. ~user/ of a user who does not exist
        error = ConfigError(f"cannot locate the data dir: {exc}", key="telemetry.data_dir")
        if cfg.strict:
            raise error from None
        loaded.error = loaded.error or str(error)
        log.error("waypost: telemetry is off: %s", error)
        return datadir.Location(app or "app", datadir.default_data_dir(app or "app"), "default")


class Deciding(Instance, Protocol):
    """What :func:`decide` reads of an instance."""

    @property
    def env(self) -> Mapping[str, str]: ...
    @property
    def config_file(self) -> str | None: ...
    @property
    def config_error(self) -> str | None: ...


def decide(instance: Deciding) -> Decision:
    """Whether telemetry is on for ``instance``, and the rule that decided (see
    :func:`resolve_consent`)."""
    config, env, config_file = instance.config, instance.env, instance.config_file
    if instance.config_error is not None:
        return Decision(
            False, "config_error", f"the configuration is invalid: {instance.config_error}"
        )
    if config.level == "off":
        base = resolve_consent(config, env, None, config_source=config_file)
        if base.rule in ("do_not_track", "app_env"):
            return base
        return Decision(False, "level", "telemetry.level is off")
    stored = StoredConsent.read(instance.data_dir)
    source = config_file
    if env.get("WAYPOST_ENABLED"):
        source = f"the environment (WAYPOST_ENABLED={env['WAYPOST_ENABLED']})"
    return resolve_consent(config, env, stored, config_source=source)


def prepare_data_dir(data_dir: Path, notes: list[str]) -> str:
    """Create the data dir and return the instance id. Nothing found there stops telemetry:
    what cannot be read is replaced, what cannot be written is kept in memory (``notes`` say
    so)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        notes.append(f"cannot create the data dir {data_dir}: {exc}")
        log.warning("waypost: %s", notes[-1])
    instance_id, note = datadir.instance_id_or_temporary(data_dir)
    if note:
        notes.append(note)
    return instance_id


def show_notice(
    config: TelemetryConfig,
    *,
    app: str,
    data_dir: Path,
    rule: str,
    show: Callable[[str], None] | None,
    notes: list[str],
) -> None:
    """Show the first-run notice if it is due. One that cannot be shown raises a
    :class:`WaypostError`: telemetry must not start then."""
    try:
        note = notice.show_once(config, app=app, data_dir=data_dir, rule=rule, show=show)
    except Exception as exc:
        raise WaypostError(
            secrets.sanitise(f"the first-run notice could not be shown: {exc}")
        ) from None
    if note:
        notes.append(note)
        log.warning("waypost: %s", note)


class SinkHost(Instance, Protocol):
    """What :meth:`SinkMaker.make` reads of an instance, and fills (``sinks``,
    ``sink_errors``)."""

    @property
    def sinks(self) -> dict[str, Sink]: ...
    @property
    def sink_errors(self) -> dict[str, tuple[str, str]]: ...


@dataclass
class SinkMaker:
    """Makes the configured sinks of one instance, as their own models type what was written."""

    config: TelemetryConfig
    sink_sources: Mapping[str, Any]
    plugins: PluginManager
    env: Mapping[str, str]
    config_file: str | None
    notes: list[str]
    hold: SecretHold

    @classmethod
    def of(
        cls, loaded: Loaded, plugins: PluginManager, env: Mapping[str, str], hold: SecretHold
    ) -> SinkMaker:
        """The sink maker of a loaded config (its warnings receive the sinks' notes)."""
        return cls(loaded.config, loaded.sink_sources, plugins, env, loaded.file,
                   loaded.warnings, hold)  # fmt: skip

    def make(
        self, host: SinkHost, *, tolerant: bool = False, instance_id: str | None = None
    ) -> None:
        """Make ``host``'s sinks into ``host.sinks``; one that cannot be made goes to
        ``host.sink_errors`` with its type and the reason (in strict mode it raises, unless
        ``tolerant``: inspection)."""
        context = SinkContext(
            app=host.app,
            version=host.version,
            instance_id=instance_id or host.instance_id or "",
            data_dir=host.data_dir,
            strict=host.strict,
        )
        specs: dict[str, Mapping[str, Any]] = {}
        for name, spec in self.config.sink_specs().items():
            source = self.sink_sources.get(name)
            # As written (typed by the sink's own model in make_sinks), with the type resolved.
            specs[name] = {**source, "type": spec["type"]} if isinstance(source, Mapping) else spec
        made, errors = self.plugins.make_sinks(
            specs,
            context=context,
            env=self.env,
            config_file=self.config_file,
            strict=host.strict,
            tolerant=tolerant,
            notes=self.notes,
            secrets=self.hold,
        )
        host.sinks.update(made)
        host.sink_errors.update(errors)
        secrets.guard_loggers()  # the sinks' modules may have made loggers of their own


def kept_for(config: TelemetryConfig, sink_errors: Mapping[str, object]) -> dict[str, SinkConfig]:
    """The configured sinks that could not be made, with the routing their config asks
    (``events``, ``exclude_events``; everything if even that is wrong): their events are
    kept in the outbox, within its limits, for the start that can make them."""
    specs = config.sink_specs()
    kept: dict[str, SinkConfig] = {}
    for name in sink_errors:
        spec = specs.get(name, {})
        try:
            kept[name] = SinkConfig(
                events=spec.get("events"), exclude_events=spec.get("exclude_events") or []
            )
        except Exception:
            kept[name] = SinkConfig()
    return kept


class Host(SinkHost, Protocol):
    """What :func:`start` reads of the instance it starts (a :class:`waypost.Telemetry`)."""

    @property
    def distinct_id(self) -> str: ...
    @property
    def outbox_(self) -> Outbox | None: ...
    @property
    def debug(self) -> bool: ...
    @property
    def decision(self) -> Decision: ...


@dataclass
class Running:
    """What runs while telemetry is on, as :func:`start` made it (the pipeline not started)."""

    instance_id: str
    gate: Gate
    control: ControlState
    outbox: Outbox | None
    pipeline: Pipeline


def start(
    host: Host,
    *,
    sinks: SinkMaker,
    loader: PluginLoader,
    schedules: Schedules,
    log_once: LogOnce,
    notes: list[str],
    notice: Callable[[str], None] | None,
) -> Running:
    """Make what runs while ``host`` is on: its data dir and instance id, the first-run notice
    (one that cannot be shown raises: telemetry must not start), its sinks (first: sink plugins
    may implement the gate's hooks too), the gate, the control state, the outbox and the
    pipeline. The outbox's upkeep works on ``host.outbox_`` (none once consent is withdrawn)."""
    cfg = host.config
    instance_id = prepare_data_dir(host.data_dir, notes)
    show_notice(
        cfg, app=host.app, data_dir=host.data_dir, rule=host.decision.rule, show=notice, notes=notes
    )
    sinks.make(host, instance_id=instance_id)
    gate = Gate.create(
        cfg,
        host.plugins,
        app=host.app,
        version=host.version,
        instance_id=instance_id,
        distinct_id=host.distinct_id,
        counters=host.counters,
        log_once=log_once,
        on_error=loader.hook_failed,
    )
    control = gate.control = ControlState(host.data_dir)
    control.listeners.append(schedules.apply_control)
    scheduled = schedules.heartbeat_event()
    if scheduled:  # scheduled while telemetry was off: heartbeats are not sampled
        gate.heartbeats.add(scheduled)
    upkeep = OutboxUpkeep(
        lambda: host.outbox_, cfg.outbox, host.counters, sinks=host.sinks, started=time.time()
    )
    sync = cfg.outbox.durability == "sync"
    # Never raises: an outbox that cannot be used now says why in its health, and events are
    # kept in memory meanwhile.
    outbox = None if host.debug else Outbox(host.data_dir, sync=sync)

    def on_control(sink: str, block: dict[str, Any]) -> None:
        """A sink's destination answered a control block (on the sink's thread)."""
        control.receive(block, source=sink)

    pipeline = Pipeline(
        outbox=outbox,
        sinks=list(host.sinks.values()),
        build=gate.build,
        counters=host.counters,
        batch_interval=cfg.batch.interval,
        batch_size=cfg.batch.size,
        buffer_size=cfg.outbox.buffer,
        backoff=Backoff(initial=cfg.retry.initial, maximum=cfg.retry.maximum),
        max_attempts=cfg.retry.max_attempts,
        breaker_threshold=cfg.retry.breaker_threshold,
        keep_sent=cfg.outbox.keep_sent,
        retention=upkeep.retention,
        startup=upkeep.startup if outbox is not None else None,
        debug=host.debug,
        strict=host.strict,
        sync=sync,
        on_control=on_control,
        paused_for=control.paused_for,
        kept_for=kept_for(cfg, host.sink_errors),
    )
    return Running(instance_id, gate, control, outbox, pipeline)


def start_failed(exc: Exception, *, strict: bool, plugin_errors: dict[str, str]) -> Decision:
    """A start failed: in strict mode, raise it (a :class:`WaypostError`); otherwise telemetry
    is off, and the decision says why (sanitised, logged; a plugin's error also goes to
    ``plugin_errors``)."""
    if strict:
        if isinstance(exc, WaypostError):
            raise exc
        raise WaypostError(f"telemetry could not start: {type(exc).__name__}: {exc}") from exc
    reason = secrets.sanitise(
        str(exc) if isinstance(exc, WaypostError) else f"{type(exc).__name__}: {exc}"
    )
    if isinstance(exc, PluginError):
        plugin_errors.setdefault(exc.plugin or "start", reason)
    log.error("waypost: telemetry is off: %s", reason)
    return Decision(False, "error", reason)


def record_installation(
    config_file: str | None, *, app: str, version: str | None, data_dir: Path
) -> None:
    """Leave what the CLI (another process, perhaps cron) needs to send as this application
    does: per user, which data dir this config file serves (``waypost --app NAME`` from
    anywhere); in the data dir, the name, version and config file."""
    from_file = config_file not in (None, "<config>")
    resolved = str(Path(str(config_file)).resolve()) if from_file else None
    if resolved is not None:
        datadir.remember_installation(resolved, app, data_dir)
    datadir.record_installation(data_dir, app=app, version=version, config_file=resolved)
