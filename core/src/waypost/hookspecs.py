"""The hooks a plugin may implement. Mark implementations with ``waypost.hookimpl``.

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
    from waypost.privacy import Rule
    from waypost.sinks import Sink

hookspec = pluggy.HookspecMarker("waypost")
hookimpl = pluggy.HookimplMarker("waypost")


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


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add commands to the ``waypost`` CLI.

    :param cli: the root ``click.Group``; add commands with ``@cli.command()``.
    """


@hookspec
def waypost_before_send(event: Event) -> Event | bool | None:
    """Look at an event after the privacy gate and before it is stored and sent.

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
