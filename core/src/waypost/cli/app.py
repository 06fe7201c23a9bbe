"""The ``waypost`` command group: global options, the context every command gets, and the
commands plugins add.

Exit codes: 0 done, 1 the action did not complete (e.g. a flush left events pending), 2 bad
usage or configuration.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import click

from waypost.delivery.storage import StorageUnavailable
from waypost.errors import ConfigError, WaypostError

if TYPE_CHECKING:
    from waypost.plugins import PluginManager
    from waypost.telemetry import Telemetry

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


class Failure(click.ClickException):
    """An error that names its cause (``cause``: the exception behind it, if any); exits with
    status 2 (bad usage or configuration)."""

    exit_code = 2

    def __init__(self, message: str, *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class Ctx:
    def __init__(self, config: str | None, app: str | None, data_dir: str | None) -> None:
        self.config = config
        self.app = app
        self.data_dir = data_dir
        self._warned = False
        self._version: str | None = None
        self._probed = False

    def telemetry(
        self, *, start: bool = False, tolerant: bool = True, strict: bool = True
    ) -> Telemetry:
        """The application's Telemetry as seen from here. ``tolerant``: a sink that cannot be
        made here (its plugin missing or broken, its secret not in this environment) is shown
        in ``status`` as ``error``, not fatal. ``strict=False`` for an instance that delivers
        (``flush``, ``send-heartbeat``): what one sink cannot do does not stop the others (the
        config was checked by a strict instance first)."""
        from waypost.telemetry import Telemetry

        if start and not self._probed:
            self.telemetry()  # the config checked strictly, the application's version read
        config, data_dir = self._where()
        try:
            tel = Telemetry(
                app=self.app,
                version=self._version,
                config=config,
                data_dir=data_dir,
                strict=strict,
                start=start,
                notice=lambda text: None,
            )
            if not self._probed:
                self._probed = True
                self._version = self._recorded_version(tel)
                if self._version is not None:
                    tel.version = self._version
            if not start:
                tel.inspect_sinks(tolerant=tolerant)
        except WaypostError as exc:
            raise Failure(str(exc), cause=exc) from None
        if tel.config_error is not None:
            raise Failure(tel.config_error)
        self._warn(tel)
        return tel

    def _where(self) -> tuple[str | None, str | None]:
        """The config file and data dir to use. ``--app NAME`` with no config here: the file
        (and data dir) that application last ran with, from the record it left."""
        if self.config is not None or self.app is None:
            return self.config, self.data_dir
        import os

        from waypost.config import find_config
        from waypost.datadir import recall_app

        if find_config(os.environ) is not None:
            return None, self.data_dir
        found = recall_app(self.app)
        if found is None or not os.path.isfile(found[0]):
            return None, self.data_dir
        config_file, entry = found
        return config_file, self.data_dir or entry["data_dir"]

    @staticmethod
    def _recorded_version(tel: Telemetry) -> str | None:
        """The version events sent from here carry: the config's, else the one the
        application recorded in its data dir (None: the config's or none)."""
        if tel.config.version:
            return None
        from waypost.datadir import read_installation

        version = read_installation(tel.data_dir).get("version")
        return str(version) if version else None

    def _warn(self, tel: Telemetry) -> None:
        if self._warned:
            return
        self._warned = True
        for warning in tel.config_warnings:
            click.echo(f"warning: {warning}", err=True)
        for error in tel.plugin_errors.values():
            click.echo(f"warning: telemetry.plugins: {error}", err=True)
        if tel.data_dir_source == "default" and not (self.app or tel.config.app):
            click.echo(
                f"warning: no application name or data dir given; using {tel.data_dir}. "
                "Set telemetry.app or telemetry.data_dir in the config (or pass --app) so "
                "the CLI works on the application's own records.",
                err=True,
            )


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

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        if not standalone_mode:
            return super().main(argv, prog_name, complete_var, False, **extra)
        options = argv[: argv.index("--")] if "--" in argv else argv
        as_json = "--json" in options
        try:
            return super().main(argv, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code, as_json, exc)
        except WaypostError as exc:
            _fail(str(exc), 2, as_json, exc)
        except click.exceptions.Abort:
            _fail("aborted", 1, as_json, None)
        except (OSError, sqlite3.Error, StorageUnavailable) as exc:
            # The data dir or the outbox refused (read-only, locked, corrupt, not a directory):
            # the action did not complete, said in one line, never with a traceback.
            _fail(_storage_message(exc), 1, as_json, exc)

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


def _storage_message(exc: Exception) -> str:
    """What the data dir or the outbox refused, in one line."""
    if isinstance(exc, StorageUnavailable):
        return f"the outbox: {exc.reason}"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"the data dir: {exc.strerror or exc}: {exc.filename}"
    return f"the data dir: {type(exc).__name__}: {exc}"


def _fail(message: str, code: int, as_json: bool, exc: BaseException | None) -> NoReturn:
    """Report an error and exit: as JSON on standard output when ``--json`` was given (so a
    script reading it gets JSON whatever happened), else ``Error: ...`` on standard error."""
    if as_json:
        data: dict[str, Any] = {"ok": False, "error": message, "exit_code": code}
        cause = exc.cause if isinstance(exc, Failure) else exc
        if isinstance(cause, ConfigError):
            data.update(source=cause.source, key=cause.key)
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    elif isinstance(exc, click.ClickException) and not isinstance(exc, Failure):
        exc.show()  # usage errors come with the command's usage line
    else:
        click.echo(f"Error: {message}", err=True)
    sys.exit(code)
