"""``waypost collector ...``: serve, check, stats, receipt, consume. Registered through the core's
command hook (``register_commands``); importing this module costs only click.

Exit codes as the core's CLI: 0 done, 1 not found or not done, 2 bad usage or configuration.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

import waypost


class Failure(click.ClickException):
    """An error that names its cause; exits with status 2."""

    exit_code = 2


config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    envvar="WAYPOST_COLLECTOR_CONFIG",
    help="Collector config (YAML or TOML); default: collector.yml in this directory.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def _config(config_file: str | None) -> Any:
    from waypost.errors import WaypostError
    from waypost_collector.config import load_config

    try:
        return load_config(config_file)
    except WaypostError as exc:
        raise Failure(str(exc)) from None


@click.group("collector")
def collector() -> None:
    """Run and inspect a waypost collector: the endpoint that receives what waypost's http
    sink sends, checks it, and stores it through waypost's sinks."""


@collector.command()
@config_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8047, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256))
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
)
def serve(config_file: str | None, host: str, port: int, workers: int, log_level: str) -> None:
    """Serve the collector with uvicorn (several worker processes share the data dir)."""
    import uvicorn

    from waypost.errors import WaypostError
    from waypost_collector.app import create_app

    config = _config(config_file)
    # The client's address is ours to find (trusted_proxies): uvicorn must not rewrite it from
    # X-Forwarded-For, and its access log, which prints addresses, stays off.
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": log_level,
        "proxy_headers": False,
        "access_log": False,
        "server_header": False,
        "timeout_graceful_shutdown": 10,
    }
    if workers == 1:
        try:
            app = create_app(config)
        except WaypostError as exc:
            raise Failure(str(exc)) from None
        uvicorn.run(app, **options)
        return
    if config.source in (None, "<config>"):
        raise Failure("--workers needs a config file (each worker reads it)")
    os.environ["WAYPOST_COLLECTOR_CONFIG"] = str(Path(config.source).resolve())
    uvicorn.run("waypost_collector.app:from_environment", factory=True, workers=workers, **options)


@collector.command()
@config_option
@json_option
def check(config_file: str | None, as_json: bool) -> None:
    """Validate the config: apps, schemas, storage sinks (nothing is opened or sent)."""
    from waypost.errors import WaypostError
    from waypost_collector.intake import app_schemas
    from waypost_collector.spool import build_storage

    config = _config(config_file)
    search = [str(Path(config.source).resolve().parent)] if config.source != "<config>" else []
    apps: dict[str, Any] = {}
    warnings: list[str] = []
    try:
        for name, app in config.apps.items():
            schemas = app_schemas(name, app, search)
            apps[name] = {
                "token": app.token is not None,
                "signed": app.signing_secret is not None,
                "declared_events": sorted(schemas.events),
                "accept_undeclared": app.accept_undeclared,
                "control": name in config.control,
            }
            if app.token is None:
                warnings.append(f"app {name!r} has no token: anyone may send it events")
        sinks = build_storage(config, version=waypost.__version__)
    except WaypostError as exc:
        raise Failure(str(exc)) from None
    data = {
        "ok": True,
        "config_file": config.source,
        "data_dir": str(config.data_dir),
        "apps": apps,
        "storage": [
            {"name": s.name, "type": s.type, "destination": s.destination} for s in sinks.values()
        ],
        "embedded_storage": config.embedded_storage,
        "ip": config.ip,
        "warnings": warnings,
    }
    if as_json:
        _dump(data)
        return
    click.echo(f"{config.source}: ok")
    for name, info in apps.items():
        declared = ", ".join(info["declared_events"]) or "any (no schemas)"
        click.echo(f"  app {name}: token {'yes' if info['token'] else 'NO'}, "
                   f"signed {'yes' if info['signed'] else 'no'}, events: {declared}")  # fmt: skip
    for sink in data["storage"]:
        click.echo(f"  storage {sink['name']} ({sink['type']}) -> {sink['destination']}")
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)


def _read_state(config: Any) -> dict[str, Any]:
    from waypost.delivery.outbox import Outbox
    from waypost_collector.ledger import Ledger
    from waypost_collector.spool import SPOOL_DIR, storage_lag

    data_dir = Path(config.data_dir)
    if not (data_dir / "ledger.sqlite3").exists():
        return {"apps": {}, "spool": {}, "storage_lag_seconds": None}
    ledger = Ledger(data_dir)
    totals = ledger.totals()
    spool: dict[str, Any] = {}
    lag = None
    if (data_dir / SPOOL_DIR / "outbox.sqlite3").exists():
        outbox = Outbox(data_dir / SPOOL_DIR)
        spool, lag = outbox.counts(), storage_lag(outbox)
        outbox.close()
    ledger.close()
    return {"apps": totals, "spool": spool, "storage_lag_seconds": lag}


@collector.command()
@config_option
@json_option
def stats(config_file: str | None, as_json: bool) -> None:
    """Accepted, refused by reason, duplicates, spool depth and storage lag, per app."""
    config = _config(config_file)
    data = _read_state(config)
    for name in config.apps:
        data["apps"].setdefault(
            name, {"accepted": 0, "duplicate": 0, "retry": 0, "refused": {}, "requests_refused": {}}
        )
    if as_json:
        _dump(data)
        return
    for name, entry in sorted(data["apps"].items()):
        refused = ", ".join(f"{r} {n}" for r, n in sorted(entry["refused"].items())) or "none"
        requests = (
            ", ".join(f"{r} {n}" for r, n in sorted(entry["requests_refused"].items())) or "none"
        )
        click.echo(
            f"{name}: accepted {entry['accepted']}, duplicates {entry['duplicate']}, "
            f"asked to retry {entry['retry']}; events refused: {refused}; requests refused: "
            f"{requests}"
        )
    for sink, states in sorted(data["spool"].items()):
        shown = ", ".join(f"{s} {n}" for s, n in sorted(states.items()))
        click.echo(f"spool rows for {sink} (a batch of up to 100 events each): {shown}")
    lag = data["storage_lag_seconds"]
    click.echo(f"storage lag: {'none' if lag is None else f'{lag:.1f} s'}")


@collector.command()
@click.argument("receipt_id", metavar="ID")
@config_option
@json_option
def receipt(receipt_id: str, config_file: str | None, as_json: bool) -> None:
    """What the submission with this receipt held: its events and their outcome."""
    from waypost_collector.ledger import Ledger

    config = _config(config_file)
    found = None
    if (Path(config.data_dir) / "ledger.sqlite3").exists():
        ledger = Ledger(Path(config.data_dir))
        found = ledger.receipt(receipt_id.strip())
        ledger.close()
    if found is None:
        if as_json:
            _dump({"receipt": receipt_id, "found": False})
        else:
            click.echo(f"no receipt {receipt_id!r} in {config.data_dir} (kept for "
                       f"{config.retention.receipts / 86400:g} days)", err=True)  # fmt: skip
        sys.exit(1)
    if as_json:
        _dump({**found, "found": True})
        return
    click.echo(
        f"receipt {found['receipt']}: app {found['app']}, received {found['received_at']}, "
        f"accepted {found['accepted']}, duplicates {found['duplicates']}, "
        f"refused {found['refused']}"
    )
    for event in found["events"]:
        click.echo(f"  {event['outcome']:9} {event['id']}  {event['name']}")
    for refusal in found["refusals"]:
        click.echo(f"  refused   {refusal['id']}  {refusal['reason']}: {refusal['detail']}")


@collector.command()
@config_option
@click.option("--from", "source", required=True, help="A kafka sink of collector.storage.")
@click.option("--to", "target", required=True, help="A sink of collector.destinations.")
@click.option("--group", default=None, help="Consumer group; default waypost-collector-<to>.")
@click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--max-wait", default=1.0, show_default=True, type=click.FloatRange(0.01, 60))
@click.option(
    "-X",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="A librdkafka consumer setting, e.g. -X session.timeout.ms=10000 (repeatable).",
)
def consume(
    config_file: str | None,
    source: str,
    target: str,
    group: str | None,
    batch_size: int,
    max_wait: float,
    settings: tuple[str, ...],
) -> None:
    """Move events from a Kafka storage topic into a sink, as a member of a consumer group
    (run any number); offsets are committed only once the sink has the events."""
    import signal
    import threading

    from waypost.errors import WaypostError
    from waypost_collector.consume import make_mover

    config = _config(config_file)
    extra = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise Failure(f"-X {item!r}: write KEY=VALUE")
        extra[key.strip()] = value.strip()
    try:
        mover = make_mover(
            config,
            source,
            target,
            group=group,
            batch_size=batch_size,
            max_wait=max_wait,
            settings=extra,
        )
    except WaypostError as exc:
        raise Failure(str(exc)) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    click.echo(
        f"consuming {', '.join(mover.topics)} as {mover.group} into {target} "
        f"({mover.sink.destination})",
        err=True,
    )
    moved = mover.run(stop)
    click.echo(
        f"delivered {moved.delivered}, refused {moved.refused}, undecodable "
        f"{moved.undecodable}, duplicates {moved.duplicates}, retries {moved.retries}",
        err=True,
    )


@waypost.hookimpl
def register_commands(cli: click.Group) -> None:
    """The ``waypost collector`` command group."""
    cli.add_command(collector)
