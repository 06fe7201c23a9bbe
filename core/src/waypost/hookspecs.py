"""The hooks a plugin may implement. Mark implementations with ``waypost.hookimpl``
(``registering`` makes the common ``register_sinks`` one).

Hooks grow by adding arguments that implementations may leave out; none is ever removed
without a major version.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from waypost.events import Event
    from waypost.metrics import MetricExporter, MetricRegistry
    from waypost.privacy import Rule
    from waypost.sinks import Sink

hookspec = pluggy.HookspecMarker("waypost")
hookimpl = pluggy.HookimplMarker("waypost")


def registering(*sink_classes: type[Sink]) -> Callable[[Callable[[type[Sink]], None]], None]:
    """A :func:`register_sinks` implementation that registers ``sink_classes``, for the module
    an entry point names: ``register_sinks = registering(AcmeSink)`` there is the same as
    ``@hookimpl`` on a ``register_sinks(register)`` that calls ``register(AcmeSink)``."""

    def register_sinks(register: Callable[[type[Sink]], None]) -> None:
        for sink_class in sink_classes:
            register(sink_class)

    return hookimpl(register_sinks)


@hookspec
def register_sinks(register: Callable[[type[Sink]], None]) -> None:
    """Contribute sink classes: call ``register(SinkClass)`` once per class.

    :param register: takes a :class:`waypost.Sink` subclass whose ``type`` is the
        entry-point name under ``waypost.sinks``.
    """


@hookspec
def register_scrubbers(register: Callable[[Rule], None]) -> None:
    """Contribute scrubbing rules: call ``register(waypost.privacy.Rule(...))``.

    :param register: takes a :class:`waypost.privacy.Rule`; its pattern is redacted from every
        string property, after the built-in rules. A rule may carry a ``check`` (confirm a
        match), a ``replacement`` and its own ``flags``; patterns are joined into one regular
        expression, so they must not use numbered backreferences.
    """


@hookspec(historic=True)
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``waypost`` CLI (called once for each plugin, as it is loaded).

    The CLI loads the plugin of entry point ``NAME`` in group ``waypost.sinks`` when it is
    asked for a command ``NAME`` it does not know, and every plugin for ``waypost --help``:
    name the entry point after the command (or command group) the plugin adds.

    :param cli: the root ``click.Group``; add commands with ``@cli.command()`` or a group with
        ``cli.add_command(group)``.
    """


@hookspec
def register_metric_exporters(
    register: Callable[[str, Callable[[MetricRegistry, dict[str, Any]], MetricExporter]], None],
) -> None:
    """Contribute metric exporters: call ``register(name, attach)`` once per exporter.

    An exporter starts when ``telemetry.metrics`` has a key ``name`` (or the application calls
    ``attach`` itself); waypost imports the plugin of entry point ``name`` in group
    ``waypost.sinks`` to find it, so name the entry point after the exporter.

    :param register: takes the exporter's name (its key under ``telemetry.metrics``) and
        ``attach(registry, settings)``, which starts the exporter for a
        :class:`waypost.MetricRegistry` with the settings under that key (a dict) and returns
        a :class:`waypost.metrics.MetricExporter` (``destinations()``, ``close(timeout)``).
    """


@hookspec
def waypost_before_send(event: Event) -> Event | bool | None:
    """Look at an event after the privacy gate and before it is stored and sent.

    The one chained hook: each implementation (the newest plugin first) gets what the one
    before returned. A wrapper implementation (``hookimpl(wrapper=True)``) is refused when its
    plugin is registered.

    Return ``False`` to drop it, another :class:`waypost.Event` to replace it, or ``None`` to
    keep it (changes made in place are kept). Whatever comes back passes the scrubbers again,
    so this hook cannot re-add redacted data.

    :param event: the event, already scrubbed.
    """


@hookspec
def waypost_context(context: dict[str, Any]) -> dict[str, Any] | None:
    """Enrich the context sent with every event; called once when telemetry starts.

    :param context: the context so far (app, os, python, waypost); return a dict to merge in.
    """


@hookspec
def waypost_heartbeat(facts: dict[str, Any]) -> dict[str, Any] | None:
    """Contribute facts to the heartbeat payload (counts, config facts such as a driver).

    :param facts: the heartbeat built so far; return a dict to merge in (nested dicts merge).
    """
