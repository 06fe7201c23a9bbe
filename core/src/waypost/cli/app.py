"""The ``waypost`` command group: global options, the context every command gets, and the
commands plugins add.

Exit codes: 0 done, 1 the action did not complete (e.g. a flush left events pending), 2 bad
usage or configuration.
"""

from __future__ import annotations

import sys
import warnings
from typing import TYPE_CHECKING, Any

import click

from waypost.errors import WaypostError

if TYPE_CHECKING:
    from waypost.plugins import PluginManager
    from waypost.telemetry import Telemetry

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


class Failure(click.ClickException):
    """An error that names its cause; exits with status 2."""

    exit_code = 2


class Ctx:
    def __init__(self, config: str | None, app: str | None, data_dir: str | None) -> None:
        self.config = config
        self.app = app
        self.data_dir = data_dir

    def telemetry(self, *, start: bool = False, tolerant: bool = False) -> Telemetry:
        """The application's Telemetry as seen from here. ``tolerant``: a sink whose secret is
        not in this environment is reported in ``status``, not fatal (read-only commands)."""
        from waypost.telemetry import Telemetry

        try:
            tel = Telemetry(
                app=self.app,
                config=self.config,
                data_dir=self.data_dir,
                strict=True,
                start=start,
                notice=lambda text: None,
            )
            if not start:
                tel.inspect_sinks(tolerant=tolerant)
            if tel.data_dir_source == "default" and not self.app:
                click.echo(
                    f"warning: no application name or data dir given; using {tel.data_dir}. "
                    "Set telemetry.app or telemetry.data_dir in the config (or pass --app) so "
                    "the CLI works on the application's own records.",
                    err=True,
                )
        except WaypostError as exc:
            raise Failure(str(exc)) from None
        return tel


class PluginCommands:
    """The commands plugins add (hook ``register_commands``), loaded only when asked for: a
    plugin is imported when its entry point's name is the command asked for, and all of them
    for ``waypost --help`` or a command nobody else knows. A broken plugin is reported, never
    fatal."""

    def __init__(self, group: click.Group) -> None:
        self.group = group
        self._pm: PluginManager | None = None
        self._all = False

    def _manager(self) -> PluginManager:
        if self._pm is None:
            from waypost.plugins import PluginManager

            pm = self._pm = PluginManager()
            # Historic: every plugin registered from now on adds its commands at once.
            pm.hook.register_commands.call_historic(kwargs={"cli": self.group})
            self._load_deprecated(pm)
        return self._pm

    @staticmethod
    def _load_deprecated(pm: PluginManager) -> None:
        from waypost.plugins import COMMANDS_GROUP, deprecated_group, entry_points

        for name, ep in entry_points(COMMANDS_GROUP).items():
            warnings.warn(
                f"plugin commands {ep.value!r}: {deprecated_group(COMMANDS_GROUP)}",
                DeprecationWarning,
                stacklevel=2,
            )
            try:
                pm.register_module(ep.load(), name=f"commands:{name}")
            except Exception as exc:
                click.echo(f"warning: plugin commands {ep.value!r} failed to load: {exc}", err=True)

    def _report(self, name: str, exc: Exception) -> None:
        click.echo(f"warning: plugin {name!r} failed to load: {exc}", err=True)

    def load(self, name: str) -> None:
        """Load what may add command ``name``: the plugin of that name, else every plugin."""
        from waypost.errors import PluginError

        pm = self._manager()
        if name in pm.entry_points and not pm.info(name).loaded and not pm.info(name).error:
            try:
                pm.load_plugin(name)
            except PluginError as exc:
                self._report(name, exc)
        if name not in self.group.commands:
            self.load_all()

    def load_all(self) -> None:
        if not self._all:
            self._all = True
            self._manager().load_all(report=self._report)


class _Group(click.Group):
    plugin_commands: PluginCommands

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().main(*args, **kwargs)
        except WaypostError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = super().get_command(ctx, cmd_name)
        if found is None:  # not one of ours: perhaps a plugin's
            self.plugin_commands.load(cmd_name)
            found = super().get_command(ctx, cmd_name)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.plugin_commands.load_all()
        return super().list_commands(ctx)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    envvar="WAYPOST_CONFIG",
    help="Config file (YAML or TOML); default: telemetry.yml in this directory.",
)
@click.option("--app", envvar="WAYPOST_APP", help="Application name (when the config has none).")
@click.option("--data-dir", envvar="WAYPOST_HOME", help="Data directory (outbox, consent, ids).")
@click.version_option(package_name="waypost")
@click.pass_context
def cli(ctx: click.Context, config: str | None, app: str | None, data_dir: str | None) -> None:
    """See, limit and switch off what an application's telemetry sends."""
    ctx.obj = Ctx(config, app, data_dir)


cli.plugin_commands = PluginCommands(cli)
