"""The collector itself, apart from HTTP: each app's token, signature and schemas, the checks
every event passes on arrival, the address's hash, the rates, the spool and the ledger."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waypost_http import verify_signature

from waypost.config import TelemetryConfig
from waypost.events import NO_REMARKS, Event, uuid7
from waypost.plugins import PluginManager
from waypost.privacy import IpHasher, Scrubber
from waypost_collector.config import AppConfig, CollectorConfig
from waypost_collector.control import control_block
from waypost_collector.ledger import Entry, Ledger
from waypost_collector.limits import Buckets, Pseudonyms, client_address
from waypost_collector.schemas import Schemas
from waypost_collector.spool import Spool, build_storage
from waypost_collector.wire import Arrival, Refused, Rejection, check_envelope

log = logging.getLogger("waypost.collector")

SALT_FILE = "ip-salt.json"
HASH_TTL = 60.0
"""Seconds an address's hash is kept in memory (under its in-process pseudonym)."""
FREE_FORM = frozenset({"heartbeat"})
"""Events every app may send without declaring a payload: the core's heartbeat snapshot."""


def app_schemas(name: str, app: AppConfig, search: list[str]) -> Schemas:
    """The schemas ``app`` declares (``search``: where its modules may be, besides sys.path)."""
    return Schemas.load(
        app.schemas,
        accept_undeclared=app.accept_undeclared,
        free_form=FREE_FORM | {app.ping_event},
        key=f"collector.apps.{name}.schemas",
        search=search,
    )


@dataclass
class App:
    """One configured app, ready to check requests."""

    name: str
    config: AppConfig
    schemas: Schemas
    token: bytes | None

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), self.token)


@dataclass
class Checked:
    """A batch after the per-event checks: what goes to the spool, and what does not."""

    events: list[Event]
    rejections: list[Rejection]
    retry: list[str]
    version: str | None


class Collector:
    """Everything a request handler needs; :func:`waypost_collector.create_app` serves it."""

    def __init__(
        self,
        config: CollectorConfig,
        *,
        plugins: PluginManager | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        from waypost_collector import __version__

        self.config = config
        self.version = __version__
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        source = config.source
        search = [str(Path(source).resolve().parent)] if source and source != "<config>" else []
        self.apps: dict[str, App] = {}
        for name, app in config.apps.items():
            schemas = app_schemas(name, app, search)
            token = app.token.get_secret_value().encode() if app.token else None
            self.apps[name] = App(name, app, schemas, token)
        scrub = config.scrub
        self.scrubber = (
            Scrubber.from_config(TelemetryConfig(scrub=scrub)) if scrub.enabled else None
        )
        self.ledger = Ledger(self.data_dir)
        self.sinks = build_storage(config, version=self.version, plugins=plugins, env=env)
        if config.embedded_storage:
            from waypost_collector.storage import prepare_embedded

            for sink in self.sinks.values():
                prepare_embedded(sink)
        self.spool = Spool(
            config,
            self.sinks,
            self.ledger,
            max_bytes=config.limits.max_spool_mb * 1024 * 1024,
            housekeeping=self._expire_embedded if config.embedded_storage else None,
        )
        limits = config.limits
        self.addresses = Buckets(limits.per_address)
        self.installations = Buckets(limits.per_installation)
        self.pseudonyms = Pseudonyms()
        self.hasher = (
            IpHasher(self.data_dir / SALT_FILE, rotate_every=86400.0)
            if config.ip == "hash"
            else None
        )
        self._hashes: dict[str, tuple[float, str]] = {}
        self.started = time.time()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.spool.start()

    def stop(self, timeout: float = 10.0) -> bool:
        return self.spool.stop(timeout)

    # --- one request ------------------------------------------------------------------------

    def app(self, name: str) -> App:
        app = self.apps.get(name)
        if app is None:
            raise Refused(404, "unknown_app", f"no app named {name[:64]!r} is collected here")
        return app

    def address(
        self, app: str, peer: str | None, forwarded_for: list[str]
    ) -> tuple[str | None, str | None]:
        """The client's address (for rates, in memory only) and its stored form (daily hash,
        or None with ``ip: drop``). Refuses with 429 past the per-address rate."""
        address = client_address(peer, forwarded_for, self.config.trusted_proxies)
        if address is None:
            return None, None
        pseudonym = self.pseudonyms(address)
        wait = self.addresses.take(pseudonym)
        if wait:
            raise Refused(
                429, "rate_limited", "too many requests from this address", retry_after=wait
            )
        if self.hasher is None:
            return address, None
        now = time.monotonic()
        cached = self._hashes.get(pseudonym)
        if cached is not None and cached[0] > now:
            return address, cached[1]
        # The salt file is read once a minute per address, not on every request; a hash made
        # just before the daily rotation is used for at most that minute after it.
        hashed = self.hasher.hash(address)
        if len(self._hashes) > 100_000:
            self._hashes.clear()
        self._hashes[pseudonym] = (now + HASH_TTL, hashed)
        return address, hashed

    def authorize(self, app: App, authorization: str | None) -> None:
        if not app.authorized(authorization):
            raise Refused(401, "bad_token", "the bearer token is missing or wrong")

    def verify(self, app: App, headers: Mapping[str, str], raw: bytes) -> None:
        secret = app.config.signing_secret
        if secret is None:
            return
        if not verify_signature(
            secret.get_secret_value(), headers, raw, tolerance=app.config.signature_tolerance
        ):
            raise Refused(
                401,
                "bad_signature",
                "X-Waypost-Signature does not match the body, or X-Waypost-Timestamp is "
                f"missing or more than {app.config.signature_tolerance:g} s off",
            )

    def refuse_if_full(self, app: str) -> None:
        if self.spool.full() or not self.spool.running:
            raise Refused(503, "unavailable", "the spool is full or down", retry_after=30)

    def check(self, app: App, items: list[Any], now: float, *, body_size: int) -> Checked:
        """Every item's envelope, the app's schemas, the installation's rate, the scrubbers."""
        limits = self.config.limits
        if len(items) > limits.max_events:
            raise Refused(
                413,
                "too_large",
                f"{len(items)} events in one request; at most {limits.max_events} "
                "(limits.max_events)",
            )
        # One event can be too large only if the whole body is: most bodies need no measuring.
        measure = body_size > limits.max_event_bytes
        arrivals: list[Arrival] = []
        rejections: list[Rejection] = []
        contexts: dict[bytes, dict[str, Any]] = {}
        for item in items:
            checked = check_envelope(item, now, limits, measure=measure, contexts=contexts)
            if isinstance(checked, Rejection):
                rejections.append(checked)
            else:
                arrivals.append(checked)
        return self.admit(app, arrivals, rejections)

    def admit(self, app: App, arrivals: list[Arrival], rejections: list[Rejection]) -> Checked:
        """Arrivals whose envelope passed: schemas, rate, scrubbing, into core Events."""
        events: list[Event] = []
        retry: list[str] = []
        wanted: dict[str, int] = {}
        for arrival in arrivals:
            wanted[arrival.instance_id] = wanted.get(arrival.instance_id, 0) + 1
        granted = {key: self.installations.grant(key, n) for key, n in wanted.items()}
        scrubber = self.scrubber if app.config.scrub else None
        version: str | None = None
        # Events of one installation share their context: it is made ready once per batch.
        ready: dict[int, tuple[dict[str, Any], list[str]]] = {}
        for arrival in arrivals:
            checked = app.schemas.check(arrival.name, arrival.properties)
            if isinstance(checked, tuple):
                rejections.append(Rejection(arrival.id, *checked))
                continue
            if granted[arrival.instance_id] <= 0:
                retry.append(arrival.id)
                continue
            granted[arrival.instance_id] -= 1
            shared = ready.get(id(arrival.context))
            if shared is None:
                shared = ready[id(arrival.context)] = self._context(app, arrival.context, scrubber)
            context, context_remarks = shared
            remarks = list(context_remarks)
            properties = checked
            distinct_id, instance_id = arrival.distinct_id, arrival.instance_id
            if scrubber is not None:
                properties = scrubber.scrub(properties, "properties", remarks)
                instance_id = scrubber.scrub_text(instance_id, "instance_id", remarks)
                distinct_id = scrubber.scrub_text(distinct_id, "distinct_id", remarks)
            if version is None:
                found = context["app"].get("version")
                version = found if isinstance(found, str) else None
            events.append(
                Event(
                    arrival.id, arrival.name, arrival.time, instance_id, properties, context,
                    distinct_id, "usage", remarks or NO_REMARKS,
                )
            )  # fmt: skip
        if rejections:
            log.info(
                "waypost collector: app %s: %d events refused (first: %s)",
                app.name,
                len(rejections),
                rejections[0].reason,
            )
        return Checked(events, rejections, retry, version)

    @staticmethod
    def _context(
        app: App, context: dict[str, Any], scrubber: Scrubber | None
    ) -> tuple[dict[str, Any], list[str]]:
        """An arriving context made ready to keep: scrubbed, named for the app the token
        vouches for (whatever the client said)."""
        remarks: list[str] = []
        if scrubber is not None:
            context = scrubber.scrub(context, "context", remarks)
        found = context.get("app")
        context = {
            **context,
            "app": {**(found if isinstance(found, dict) else {}), "name": app.name},
        }
        return context, remarks

    def entry(self, app: App, checked: Checked, ip_hash: str | None, now: float) -> Entry:
        return Entry(
            receipt=uuid7(now),
            app=app.name,
            at=now,
            ip_hash=ip_hash,
            version=checked.version,
            accepted=[],
            duplicates=[],
            refused=[r.as_dict() for r in checked.rejections],
            retry=checked.retry,
            control=self.control(app.name, checked.version),
        )

    def control(self, app: str, version: str | None) -> dict[str, Any]:
        return control_block(self.config.control.get(app), version)

    # --- housekeeping -------------------------------------------------------------------------

    def _expire_embedded(self) -> None:
        """The embedded storage keeps events for ``retention.events``."""
        keep = self.config.retention.events
        if keep is None:
            return
        from waypost_collector.storage import expire_events

        for sink in self.sinks.values():
            expire_events(sink, before=time.time() - keep)
