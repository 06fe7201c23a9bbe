"""The ``waypost`` CLI's own commands: status, plugins, show, flush, purge, consent, manifest,
test-sink, send-heartbeat, demo."""

from __future__ import annotations

import json
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from waypost.cli.app import Ctx, Failure, cli, json_option
from waypost.cli.output import Output

if TYPE_CHECKING:
    from waypost.delivery.outbox import Record
    from waypost.plugins import PluginInfo
    from waypost.telemetry import Telemetry


def _sanitised(value: Any) -> Any:
    """``value`` with every text in it passed through :func:`waypost.privacy.sanitise`."""
    from waypost.privacy import sanitise

    if isinstance(value, str):
        return sanitise(value)
    if isinstance(value, dict):
        return {_sanitised(k): _sanitised(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitised(v) for v in value]
    return value


def _dump(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str, ensure_ascii=False))


def _reason(text: str | None, config_file: str | None, sink: str) -> str:
    """A sink's error for its row of a table, without the file and key the row names."""
    if not text:
        return "-"
    for prefix in (f"{config_file}: ", f"telemetry.sinks.{sink}: "):
        text = text.removeprefix(prefix)
    return text.removeprefix(f"telemetry.sinks.{sink}.")


# --- status ------------------------------------------------------------------------------------


@cli.command()
@json_option
@click.pass_obj
def status(obj: Ctx, as_json: bool) -> None:
    """Whether telemetry is on, the rule that decided, sinks, outbox, counters."""
    tel = obj.telemetry(tolerant=True)
    st = tel.status()
    data = st.model_dump(mode="json")
    try:
        registry = tel.metrics
        data["metrics"] = registry.describe()
        data["metrics_destinations"] = registry.destinations()
    except Exception as exc:
        data["metrics"], data["metrics_destinations"] = [], []
        data["metrics_error"] = f"{type(exc).__name__}: {exc}"
    if as_json:
        _dump(data)
        return
    con = Output()
    state = ("on", "green") if st.enabled else ("off", "red")
    con.print((st.app, "bold"), " telemetry is ", state, f": {st.reason} (rule: {st.rule})")
    con.print(
        f"mode {st.mode}, level {st.level}{', debug' if st.debug else ''}; data dir {st.data_dir}"
    )
    if st.config_file:
        con.print(f"config: {st.config_file}")
    con.table(
        ("sink", "type", "state", "pending", "refused", "last success", "last error"),
        (
            (
                s.name,
                s.type,
                s.state,
                str(s.pending),
                str(s.refused),
                str(s.last_success or "-"),
                _reason(s.error or s.last_error, tel.config_file, s.name),
            )
            for s in st.sinks
        ),
    )
    con.print(f"outbox: {st.outbox_pending_events} events pending")
    if st.control is not None:
        c = st.control
        asked = ", ".join(
            f"{label} {c[key]}"
            for key, label in (("heartbeat_every", "heartbeat every"), ("sample", "sample"),
                               ("pause_until", "pause until"))
            if c.get(key) is not None
        ) or "nothing"  # fmt: skip
        period = c.get("heartbeat_period")
        con.print(
            f"control from sink {c['source']} (received {c['received_at']}): {asked}"
            + (f"; heartbeat period in force {period:g} s" if period else "")
            + ("; paused now" if c.get("paused") else "")
        )
    if st.storage.state != "ok":
        con.print((f"outbox {st.storage.state}", "red"), f": {st.storage.detail}")
    for note in [*st.storage.notes, *st.notes]:
        con.print(("note", "yellow"), f": {note}")
    user_metrics = [m for m in data["metrics"] if not m.get("builtin")]
    builtin = len(data["metrics"]) - len(user_metrics)
    con.print(
        f"metrics: {len(data['metrics'])} ({len(user_metrics)} declared by the application, "
        f"{builtin} waypost's own)"
    )
    for dest in data["metrics_destinations"]:
        where = "leaves the machine" if dest.get("leaves_machine") else "local"
        target, reason = dest.get("target", ""), dest.get("reason", "")
        active = "on" if dest.get("active") else "off"
        con.print(f"  {dest['name']}  {target}  {where}  {active}: {reason}")


# --- plugins -----------------------------------------------------------------------------------


@cli.command()
@json_option
def plugins(as_json: bool) -> None:
    """Installed plugins: distribution, version, sink types, hooks, status, deprecation."""
    import warnings

    from waypost import plugins as mechanism

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infos = [
            {**i.as_dict(), "kind": _kind(i)} for i in mechanism.PluginManager().describe_all()
        ]
    for group, kind in (
        (mechanism.METRICS_GROUP, "metrics"),
        (mechanism.COMMANDS_GROUP, "commands"),
    ):
        for ep in mechanism.entry_points(group).values():
            dist, version = mechanism.distribution_of(ep)
            infos.append(
                {
                    "name": ep.name, "kind": kind, "module": ep.value,
                    "distribution": dist, "version": version,
                    "sink_types": [], "hooks": [], "status": "not loaded", "error": None,
                    "deprecated": True, "deprecation": mechanism.deprecated_group(group),
                }
            )  # fmt: skip
    if as_json:
        _dump(infos)
        return
    rows = []
    for i in infos:
        note = "DEPRECATED: " + (i["deprecation"] or "") if i["deprecated"] else (i["error"] or "")
        rows.append(
            (i["name"], i["kind"], i["distribution"], i["version"], i["status"],
             ", ".join(i["hooks"]), note)
        )  # fmt: skip
    Output().table(("name", "kind", "distribution", "version", "status", "hooks", "note"), rows)


def _kind(info: PluginInfo) -> str:
    """What a plugin of ``waypost.sinks`` contributes, in a word (``sink`` if any sink)."""
    if info.sink_types or not info.loaded:
        return "sink"
    if "register_commands" in info.hooks:
        return "commands"
    if "register_metric_exporters" in info.hooks:
        return "metrics"
    return "hooks"


# --- records -----------------------------------------------------------------------------------


@cli.command()
@click.option("--sink", help="Only records of this sink.")
@click.option("--state", type=click.Choice(["pending", "sent", "failed"]), help="Only this state.")
@click.option("--name", "event_name", help="Only events of this name.")
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(1, 100_000),
    help="Show at most this many records.",
)
@click.option(
    "--offset",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Skip this many records first (with --limit: page through them).",
)
@json_option
@click.pass_obj
def show(
    obj: Ctx,
    sink: str | None,
    state: str | None,
    event_name: str | None,
    limit: int,
    offset: int,
    as_json: bool,
) -> None:
    """The records held in the outbox (read-only), with their redaction remarks."""
    tel = obj.telemetry(tolerant=True)
    records: list[Record] = []
    total = 0
    if tel.has_outbox():
        records, total = tel.open_outbox(read_only=True).records(
            sink=sink, state=state, name=event_name, limit=limit, offset=offset
        )
    if as_json:
        _dump({"total": total, "offset": offset, "records": [r.as_dict() for r in records]})
        return
    Output().table(
        ("seq", "sink", "event", "state", "attempts", "reason", "properties", "remarks", "receipt"),
        (
            (
                str(r.seq),
                r.sink,
                r.name,
                r.state,
                str(r.attempts),
                r.last_error or "-",
                json.dumps(r.properties)[:80],
                ", ".join(r.remarks),
                r.receipt or "-",
            )
            for r in records
        ),
        title=f"{total} records",
    )


SHUTDOWN_MARGIN = 0.5
"""Seconds a command's shutdown may take past its ``--timeout`` (what it leased is released)."""


def _left(deadline: float) -> float:
    """The shutdown budget left before ``deadline``, at least :data:`SHUTDOWN_MARGIN`."""
    return max(SHUTDOWN_MARGIN, deadline - time.monotonic())


@cli.command()
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait at most.")
@json_option
@click.pass_obj
def flush(obj: Ctx, timeout: float, as_json: bool) -> None:
    """Submit now: deliver what the outbox holds (retries are due at once).

    Exits 0 when nothing is left pending, 1 when something is (a destination down), a sink
    cannot be made here (its plugin or secret missing) or telemetry is off.
    """
    deadline = time.monotonic() + max(0.0, timeout)
    probe = obj.telemetry()
    if not probe.decision.enabled:
        _refuse(probe, as_json, "nothing is sent")
        return
    outbox = probe.open_outbox() if probe.has_outbox() else None
    before = outbox.pending_events() if outbox else 0
    tel = obj.telemetry(start=True, strict=False)
    import threading

    done = threading.Event()
    result: dict[str, Any] = {}

    def work() -> None:
        result["ok"] = tel.flush(max(0.0, deadline - time.monotonic()), force=True)
        done.set()

    threading.Thread(target=work, daemon=True).start()
    if not as_json and before > 1000:
        with Output().progress("delivering", before) as update:
            while not done.wait(0.2):
                update(max(0, before - tel.open_outbox().pending_events()))
    done.wait()
    tel.shutdown(timeout=_left(deadline))
    st = tel.status()
    pending = st.pending()
    lost = st.lost()
    data = {
        "ok": bool(result.get("ok")) and st.outbox_pending_events == 0 and not tel.sink_errors,
        "delivered": st.counters.delivered,
        "pending_before": before,
        "pending_after": st.outbox_pending_events,
        "pending": pending,
        "lost": lost,
        "storage": st.storage.model_dump(mode="json"),
        "sinks": [s.model_dump(mode="json") for s in st.sinks],
    }
    if as_json:
        _dump(data)
    else:
        click.echo(
            f"delivered {st.counters.delivered} events ({max(0, before - st.outbox_pending_events)}"
            f" of the {before} that were pending); {st.outbox_pending_events} still pending"
        )
        for name, why in pending.items():
            held = f" ({why['in_memory']} only in memory)" if why["in_memory"] else ""
            click.echo(
                f"  {name}: {why['pending']} pending{held}, {why['state']}: {why['why'] or '-'}"
            )
        for s in st.sinks:
            if s.name not in pending and (s.error or s.last_error):
                click.echo(f"  {s.name}: {s.error or s.last_error}")
        if st.storage.state != "ok":
            click.echo(f"  the outbox: {st.storage.detail}")
        for reason, n in lost.items():
            click.echo(f"  {n} events could not be kept ({reason})")
    if not data["ok"]:
        sys.exit(1)


@cli.command()
@click.option(
    "--all", "everything", is_flag=True, help="Delete every record, undelivered ones too."
)
@click.option("--sent", is_flag=True, help="Delete the records already delivered.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting everything.")
@json_option
@click.pass_obj
def purge(obj: Ctx, everything: bool, sent: bool, yes: bool, as_json: bool) -> None:
    """Delete records: all of them (asks first when undelivered events are among them,
    unless --yes), or only those already submitted."""
    if everything == sent:
        raise click.UsageError("give exactly one of --all or --sent")
    tel = obj.telemetry(tolerant=True)
    deleted = 0
    if tel.has_outbox():
        pending = tel.open_outbox().pending_events() if everything and not yes else 0
        if pending:  # only undelivered events are lost by it: then someone says yes
            question = (
                f"Delete every record in {tel.data_dir}, {pending} undelivered events among them?"
            )
            try:
                agreed = click.confirm(question, default=False, err=True)
            except click.Abort:  # no answer (closed input)
                agreed = False
            if not agreed:
                raise click.ClickException(
                    f"not confirmed: nothing deleted ({pending} undelivered events); "
                    "give --yes to delete without asking"
                )
        deleted = tel.open_outbox().purge(sent_only=sent)
    if as_json:
        _dump({"deleted": deleted, "what": "sent" if sent else "all"})
    else:
        click.echo(f"deleted {deleted} records")


# --- consent -----------------------------------------------------------------------------------


@cli.command()
@click.argument("choice", type=click.Choice(["on", "off"]))
@json_option
@click.pass_obj
def consent(obj: Ctx, choice: str, as_json: bool) -> None:
    """Store the administrator's choice. The environment and the config file still win."""
    tel = obj.telemetry(tolerant=True)
    decision = tel.set_consent(choice == "on")
    overridden = decision.rule in ("do_not_track", "app_env", "config", "config_error", "level")
    data = {
        "stored": choice,
        "enabled": decision.enabled,
        "rule": decision.rule,
        "reason": decision.reason,
        "overridden": overridden,
    }
    if as_json:
        _dump(data)
        return
    click.echo(f"stored: telemetry {choice}")
    if overridden:
        click.echo(
            f"but {decision.reason}, which overrides it: telemetry is "
            f"{'on' if decision.enabled else 'off'}"
        )


# --- manifest ----------------------------------------------------------------------------------


@cli.command()
@json_option
@click.pass_obj
def manifest(obj: Ctx, as_json: bool) -> None:
    """Exactly what is collected, generated from the registered payload classes."""
    from waypost import manifest as mf

    tel = obj.telemetry(tolerant=True)
    sinks: list[dict[str, str | None]] = [
        {"name": n, "type": s.type, "destination": s.destination} for n, s in tel.sinks.items()
    ]
    sinks += [
        {"name": n, "type": sink_type, "destination": None, "error": error}
        for n, (sink_type, error) in tel.sink_errors.items()
    ]
    metrics: list[dict[str, Any]] = []
    try:
        registry = tel.metrics
        if hasattr(registry, "describe"):
            metrics = registry.describe()
    except Exception:
        metrics = []
    import os

    search = [os.getcwd()]
    if tel.config_file not in (None, "<config>"):
        search.insert(0, os.path.dirname(os.path.abspath(tel.config_file)))
    data = mf.build(schemas=tel.config.schemas, sinks=sinks, metrics=metrics, search=search)
    if as_json:
        _dump(data)
    else:
        click.echo(mf.to_markdown(data, app=tel.app), nl=False)
    for error in data["errors"]:
        click.echo(f"error: {error}", err=True)
    if data["errors"]:
        sys.exit(1)  # a listed schema module is missing: the table would be incomplete


# --- test-sink ---------------------------------------------------------------------------------


@cli.command("test-sink")
@click.argument("name")
@json_option
@click.pass_obj
def test_sink(obj: Ctx, name: str, as_json: bool) -> None:
    """Send one test event through sink NAME and show the destination's answer.

    Exits 0 when the destination took the event, 1 when it refused it or could not be reached
    (or telemetry is off), 2 when NAME is not configured or cannot be made here.
    """
    tel = obj.telemetry()
    if name in tel.sink_errors:
        raise Failure(f"sink {name!r} cannot be made: {tel.sink_errors[name][1]}")
    if name not in tel.sinks:
        known = ", ".join([*tel.sinks, *tel.sink_errors]) or "none"
        raise Failure(f"no sink named {name!r} in the config; configured: {known}")
    if not tel.decision.enabled:
        _refuse(tel, as_json, "no test event is sent")
        return
    import time

    from waypost.datadir import ensure_instance_id
    from waypost.events import Event, base_context, uuid7

    sink = tel.sinks[name]
    instance = ensure_instance_id(tel.data_dir) if tel.data_dir.exists() else "test-instance"
    now = time.time()
    event = Event(
        id=uuid7(now),
        name="waypost_test",
        time=now,
        instance_id=instance,
        properties={"test": True},
        context=base_context(tel.app, tel.version),
        distinct_id=instance,
    )
    try:
        sink.open()
        answer = sink.test_request(event)
    except Exception as exc:
        answer = {"delivered": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        try:
            sink.close()
        except Exception:
            pass
    # The destination's answer may echo the credentials it was sent.
    answer = _sanitised(answer)
    ok = isinstance(answer, dict) and answer.get("delivered") is True
    data = {
        "ok": ok,
        "sink": name,
        "type": sink.type,
        "destination": sink.destination,
        "answer": answer,
    }
    if as_json:
        _dump(data)
    else:
        click.echo(f"{name} ({sink.type}) -> {sink.destination}")
        click.echo(json.dumps(answer, indent=2, default=str))
        if not ok:
            click.echo(f"{name}: the destination did not take the test event", err=True)
    if not ok:
        sys.exit(1)


@cli.command("send-heartbeat")
@click.option("--force", is_flag=True, help="Send even if one was sent within the period.")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for delivery.")
@json_option
@click.pass_obj
def send_heartbeat(obj: Ctx, force: bool, timeout: float, as_json: bool) -> None:
    """Send the heartbeat now and deliver it (for cron, as Firefly III's weekly job).

    At most once per period (telemetry.heartbeat.every, a day without a heartbeat section) per
    installation, however many run at once. Exits 0 when it was delivered or was not due, 1
    when it was refused, is not delivered yet (kept in the outbox for the next run) or
    telemetry is off.
    """
    deadline = time.monotonic() + max(0.0, timeout)
    probe = obj.telemetry()
    if not probe.decision.enabled:
        _refuse(probe, as_json, "no heartbeat is sent")
        return
    tel = obj.telemetry(start=True, strict=False)
    sent = tel.send_heartbeat(force=force)
    delivered = tel.flush(max(0.0, deadline - time.monotonic()))
    receipts = tel.receipts()
    tel.shutdown(timeout=_left(deadline))
    st = tel.status()
    data = {
        "sent": sent,
        "outcome": tel.last_heartbeat_outcome,
        # Refused for good is not delivered: a 400 leaves nothing pending either.
        "delivered": delivered and st.outbox_pending_events == 0 and st.counters.failed == 0,
        "pending": st.outbox_pending_events,
        "failed": st.counters.failed,
        "receipts": receipts,
        "sinks": [s.model_dump(mode="json") for s in st.sinks],
    }
    if as_json:
        _dump(data)
    else:
        click.echo(f"heartbeat: {data['outcome']}")
        for name, ids in receipts.items():
            for receipt in ids:
                click.echo(f"  {name}: receipt {receipt}")
        if data["pending"]:
            click.echo(f"  {data['pending']} events still pending in the outbox")
        if data["failed"]:
            click.echo(f"  {data['failed']} events refused by a destination")
        for s in st.sinks:
            if s.state == "error" or s.last_error:
                click.echo(f"  {s.name}: {s.error or s.last_error}")
    if not data["delivered"]:
        sys.exit(1)


def _refuse(tel: Telemetry, as_json: bool, what: str) -> None:
    data = {"ok": False, "enabled": False, "rule": tel.decision.rule, "reason": tel.decision.reason}
    if as_json:
        _dump(data)
    else:
        click.echo(f"telemetry is off ({tel.decision.reason}): {what}")
    sys.exit(1)


# --- demo --------------------------------------------------------------------------------------


@cli.command()
@click.option("--events", default=12, show_default=True, type=click.IntRange(1, 100_000))
@json_option
@click.pass_obj
def demo(obj: Ctx, events: int, as_json: bool) -> None:
    """Run a small application through the whole pipeline and show what was recorded."""
    from waypost.demo import run_demo

    result = run_demo(events=events, data_dir=obj.data_dir)
    st = result["status"]
    if as_json:
        _dump({**result, "status": st.model_dump(mode="json")})
        return
    con = Output()
    con.rule("waypost demo")
    if not st.enabled:
        con.print(
            "Telemetry is ", ("off", "red"), f": {st.reason}. Nothing was collected or written."
        )
        return
    con.table(
        ("event", "properties (as sent)", "redacted"),
        (
            (
                record["name"],
                json.dumps(record["properties"], ensure_ascii=False),  # whole: never cut
                ", ".join(record["remarks"]) or "-",
            )
            for record in result["records"]
        ),
        title=f"recorded in {result['file']}",
    )
    by_id = {record["id"]: record for record in result["records"]}
    changed = [
        (by_id[event_id]["name"], key, json.dumps(value, ensure_ascii=False),
         json.dumps(by_id[event_id]["properties"].get(key), ensure_ascii=False))
        for event_id, values in result["originals"].items()
        for key, value in values.items()
    ]  # fmt: skip
    if changed:
        con.table(
            ("event", "property", "given by the application", "as sent"),
            changed,
            title="what the scrubbers took out (the original was never stored or sent)",
        )
    c = st.counters
    con.print(
        f"accepted {c.accepted}, delivered {c.delivered} (to {len(st.sinks)} sinks), "
        f"dropped {sum(c.dropped.values())}; stored for a retry {c.stored}, "
        f"kept as sent {result['kept']} (outbox.keep_sent)"
    )
    con.print(
        f"data dir: {result['data_dir']}  (the {result['kept']} records kept: "
        f"{_own_command()} --data-dir {result['data_dir']} show --state sent)"
    )


def _own_command() -> str:
    """How the user runs waypost again from their shell: ``uv run waypost`` under ``uv run``
    (whose environment is gone once it returns), ``waypost`` when it is on the PATH, else the
    script's own path."""
    import os
    import shutil

    if os.environ.get("UV_RUN_RECURSION_DEPTH"):
        return "uv run waypost"
    script = sys.argv[0]
    found = shutil.which("waypost")
    if found and os.path.realpath(found) == os.path.realpath(script):
        return "waypost"
    return shlex.quote(os.path.abspath(script)) if os.path.exists(script) else "waypost"
