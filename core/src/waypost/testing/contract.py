"""``SinkContract``: the tests every sink must pass, whatever its transport.

The tests drive a :class:`~waypost.testing.Peer` (the ``waypost_peer`` fixture): tell it to
deliver, refuse, fail retryably, answer slowly or redirect, then read back what arrived. For an
HTTP sink the peer is the recording server, and the subclass says how to configure the sink
against a URL and how to read event ids from the requests::

    class TestMySink(SinkContract):
        sink_type = "mysink"
        secret_fields = ("api_key",)

        def config(self, url):
            return {"api_key": "secret-123", "host": url}

        def received_ids(self, requests):
            return [e["uuid"] for r in requests for e in r.json()["batch"]]

Override ``ok_response`` when the destination's success answer is not ``200 {}``, and set
``permanent_status`` / ``retry_statuses`` / ``honours_retry_after`` where the destination differs.
A sink of another transport defines a ``waypost_peer`` fixture that yields its own peer instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from waypost.testing.peer import Arrival, PeerCannot

if TYPE_CHECKING:
    import pytest

    from waypost.events import Event
    from waypost.sinks import SendResult, Sink
    from waypost.testing.peer import Peer
    from waypost.testing.server import RecordingServer, Request, Response

REDIRECTS = (301, 302, 303, 307, 308)
"""The redirects a sink must refuse to follow: its credentials would go to another host."""


class SinkContract:
    """Contract tests for a sink type; subclasses fill in the destination's specifics."""

    sink_type: ClassVar[str] = ""
    secret_fields: ClassVar[tuple[str, ...]] = ()
    permanent_status: ClassVar[int] = 400
    retry_statuses: ClassVar[tuple[int, ...]] = (429, 503)
    honours_retry_after: ClassVar[bool] = True
    needs_server: ClassVar[bool] = True

    # --- what an HTTP sink's subclass provides (the HTTP peer's convenience layer) ------------

    def config(self, url: str) -> dict[str, Any]:
        """Settings of the sink pointing at ``url`` (the recording server's base URL)."""
        raise NotImplementedError(
            f"{type(self).__name__} must define config(url), or a waypost_peer fixture whose "
            "peer gives the config"
        )

    def received_ids(self, requests: list[Request]) -> list[str]:
        """Event ids the destination received, one entry per copy, in any order."""
        raise NotImplementedError(f"{type(self).__name__} must define received_ids(requests)")

    def received_events(self, requests: list[Request]) -> list[Arrival]:
        """What arrived, read from the requests; override to give names and properties too
        (the default knows only the ids, from :meth:`received_ids`)."""
        return [Arrival(str(i)) for i in self.received_ids(requests)]

    def ok_response(self, request: Request) -> Response:
        """The destination's success answer to ``request``."""
        from waypost.testing.server import Response

        return Response(200, {})

    def error_response(self, request: Request, status: int, headers: dict[str, str]) -> Response:
        """The destination's answer with an error ``status`` (``headers`` may hold
        ``Retry-After``); the default is a JSON body ``{"error": "status <n>"}``."""
        from waypost.testing.server import Response

        return Response(status, {"error": f"status {status}"}, headers=headers)

    # --- helpers ------------------------------------------------------------------------------

    def build_sink(self, settings: dict[str, Any], tmp_path: Path) -> Sink:
        """A sink of ``sink_type`` with these settings, as the core would make it (strict)."""
        from waypost.plugins import PluginManager
        from waypost.sinks import SinkContext

        cls = PluginManager().load_sink_type(self.sink_type)
        config = cls.Config.model_validate(settings)
        context = SinkContext(
            app="testapp",
            version="1.0.0",
            instance_id="5db51f99-c6fb-4340-9c19-78adce58cc1b",
            data_dir=tmp_path,
            strict=True,
        )
        return cls(f"test-{self.sink_type}", config, context)

    def make_sink(self, url: str, tmp_path: Path, **overrides: Any) -> Sink:
        """A sink configured against ``url`` with :meth:`config` (HTTP sinks)."""
        return self.build_sink({**self.config(url), **overrides}, tmp_path)

    def peer_sink(self, peer: Peer, tmp_path: Path, **overrides: Any) -> Sink:
        """A sink configured against ``peer``."""
        return self.build_sink({**peer.config(), **overrides}, tmp_path)

    def secrets(self, peer: Peer, tmp_path: Path) -> list[str]:
        """What must never leak: the peer's own list if it has one, else the values named in
        ``secret_fields`` and every ``SecretStr`` in the config model."""
        from pydantic import BaseModel, SecretStr

        given = peer.secrets()
        if given is not None:
            return [s for s in given if len(s) >= 4]
        config = peer.config()
        found = [str(config[name]) for name in self.secret_fields if config.get(name)]

        def walk(value: object) -> None:
            if isinstance(value, SecretStr):
                found.append(value.get_secret_value())
            elif isinstance(value, BaseModel):
                for name in type(value).model_fields:
                    walk(getattr(value, name))
            elif isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    walk(item)

        walk(self.peer_sink(peer, tmp_path).config)
        return [s for s in found if len(s) >= 4]

    @staticmethod
    def _serve_ok(server: RecordingServer, contract: SinkContract) -> None:
        server.responder = contract.ok_response

    # --- the contract -------------------------------------------------------------------------

    def test_contract_entry_point_loads(self) -> None:
        from waypost.plugins import PluginManager
        from waypost.sinks import Sink

        cls = PluginManager().load_sink_type(self.sink_type)
        assert issubclass(cls, Sink)
        assert cls.type == self.sink_type

    def test_contract_config_refuses_unknown_keys(self, waypost_peer: Peer) -> None:
        from pydantic import ValidationError

        from waypost.plugins import PluginManager

        cls = PluginManager().load_sink_type(self.sink_type)
        good = waypost_peer.config()
        cls.Config.model_validate(good)
        try:
            cls.Config.model_validate({**good, "no_such_setting": 1})
        except ValidationError as exc:
            assert "no_such_setting" in str(exc)
        else:
            raise AssertionError("an unknown config key was accepted")

    def test_contract_delivers_a_batch(self, waypost_peer: Peer, tmp_path: Path) -> None:
        from waypost.testing import make_events, send_batch

        waypost_peer.deliver()
        sink = self.peer_sink(waypost_peer, tmp_path)
        sink.open()
        try:
            events = make_events(5)
            result = send_batch(sink, events)
            assert not result.retry and not result.failed, result
            _assert_arrived(waypost_peer.received(), events)
        finally:
            sink.close()

    def test_contract_retryable_answers(self, waypost_peer: Peer, tmp_path: Path) -> None:
        from waypost.testing import make_events, send_batch

        failures = waypost_peer.retryable_failures()
        if not failures:
            _skip(f"{_name(waypost_peer)} cannot fail a batch retryably")
        sink = self.peer_sink(waypost_peer, tmp_path, timeout=2)
        sink.open()
        try:
            for failure in failures:
                for wait in (None, 7.0):
                    try:
                        waypost_peer.fail_retryably(failure, retry_after=wait)
                    except PeerCannot:
                        continue
                    events = make_events(3)
                    result = send_batch(sink, events)
                    what = f"{failure}" + (f" with Retry-After {wait:g}" if wait else "")
                    assert set(result.retry) == {e.id for e in events}, (what, result)
                    assert not result.failed, (what, result)
                    if wait is not None and self.honours_retry_after:
                        assert result.retry_after == wait, (what, result.retry_after)
        finally:
            sink.close()

    def test_contract_permanent_answer(self, waypost_peer: Peer, tmp_path: Path) -> None:
        from waypost.testing import make_events, send_batch

        failures = waypost_peer.permanent_failures()
        if not failures:
            _skip(f"{_name(waypost_peer)} cannot refuse a batch")
        sink = self.peer_sink(waypost_peer, tmp_path)
        sink.open()
        try:
            for failure in failures:
                waypost_peer.refuse(failure)
                events = make_events(3)
                result = send_batch(sink, events)
                assert set(result.failed) == {e.id for e in events}, (failure, result)
                assert all(reason for reason in result.failed.values()), (failure, result)
        finally:
            sink.close()

    def test_contract_unreachable_is_retryable(self, waypost_peer: Peer, tmp_path: Path) -> None:
        from waypost.testing import make_events, send_batch

        sink = self.build_sink({**waypost_peer.unreachable_config(), "timeout": 2}, tmp_path)
        try:
            sink.open()  # opens anyway: the core retries the batches, not the configuration
            events = make_events(2)
            result = send_batch(sink, events)
            assert set(result.retry) == {e.id for e in events}, result
            assert not result.failed, result
        finally:
            sink.close()

    def test_contract_slow_answer_times_out(self, waypost_peer: Peer, tmp_path: Path) -> None:
        """An answer that comes long after ``timeout`` is given up on, and retried."""
        from waypost.testing import make_events, send_batch

        sink = self.peer_sink(waypost_peer, tmp_path, timeout=0.5)
        sink.open()
        try:
            try:
                waypost_peer.slow(5.0)
            except PeerCannot as exc:
                _skip(str(exc))
            events = make_events(2)
            result = send_batch(sink, events)
            assert set(result.retry) == {e.id for e in events}, (
                "an answer 5 s late was waited for although timeout is 0.5 s",
                result,
            )
        finally:
            sink.close()

    def test_contract_never_follows_redirects(self, waypost_peer: Peer, tmp_path: Path) -> None:
        """A redirect to another host is a permanent failure, never followed: following it
        would carry the sink's credentials (headers, a key in the query) to a host nobody
        configured."""
        from waypost.testing import make_events, send_batch

        sink = self.peer_sink(waypost_peer, tmp_path)
        sink.open()
        try:
            for status in REDIRECTS:
                try:
                    waypost_peer.redirect(status)
                except PeerCannot as exc:
                    _skip(str(exc))
                events = make_events(2)
                result = send_batch(sink, events)
                followed = waypost_peer.redirected()
                assert not followed, (
                    f"the sink followed a {status} redirect to another host ({followed} "
                    "requests reached it); build the client with redirects off "
                    "(httpx: follow_redirects=False, requests: allow_redirects=False)"
                )
                assert set(result.failed) == {e.id for e in events}, (
                    f"a {status} redirect must fail the batch for good",
                    result,
                )
        finally:
            sink.close()

    def test_contract_never_logs_secrets(
        self,
        waypost_peer: Peer,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        from waypost.testing import make_events, send_batch

        secrets = self.secrets(waypost_peer, tmp_path)
        if not secrets:
            _skip("the sink's config holds no secret")
        caplog.set_level(logging.DEBUG)
        texts: list[str] = []

        def record(sink: Sink, events: Sequence[Event]) -> None:
            # What the sink itself answers, before the core's sanitiser masks the secrets it
            # knows: a reason is the sink's to keep clean, wherever else it is used.
            try:
                raw: SendResult | None = sink.send(events)
            except Exception as exc:  # a sink may raise; its message counts as a reason
                raw = None
                texts.extend([repr(exc), str(exc)])
            if raw is not None:
                texts.extend([repr(raw), *map(str, raw.retry.values())])
                texts.extend(map(str, raw.failed.values()))
            result = send_batch(sink, events)
            texts.extend([repr(result), *result.retry.values(), *result.failed.values()])
            texts.extend([repr(sink), sink.destination, str(sink.config), repr(sink.config)])

        peer = waypost_peer
        plays: list[Callable[[], None]] = [peer.deliver]
        plays += [partial(peer.fail_retryably, f) for f in peer.retryable_failures()]
        plays += [partial(peer.refuse, f) for f in peer.permanent_failures()]
        sink = self.peer_sink(waypost_peer, tmp_path, timeout=2)
        sink.open()
        try:
            texts.append(repr(sink.render(make_events(1))))
            for play in plays:
                play()
                record(sink, make_events(2))
        finally:
            sink.close()
        down = self.build_sink({**waypost_peer.unreachable_config(), "timeout": 1}, tmp_path)
        down.open()
        record(down, make_events(1))
        down.close()
        texts.append(caplog.text)
        texts.extend(capsys.readouterr())
        for secret in secrets:
            for text in texts:
                assert secret not in text, f"a secret leaked into: {text[:200]}"

    def test_contract_close_before_open_is_harmless(
        self, waypost_peer: Peer, tmp_path: Path
    ) -> None:
        """``close`` must not assume ``open`` ran: ``waypost test-sink`` closes the sink after an
        ``open`` that failed half way, and tools close sinks they never used."""
        sink = self.peer_sink(waypost_peer, tmp_path)
        sink.close()

    def test_contract_close_is_clean(self, waypost_peer: Peer, tmp_path: Path) -> None:
        from waypost.testing import make_events, send_batch

        waypost_peer.deliver()
        sink = self.peer_sink(waypost_peer, tmp_path)
        sink.open()
        send_batch(sink, make_events(1))
        sink.close()
        sink.close()  # twice is harmless

    def test_contract_end_to_end(self, waypost_peer: Peer, waypost_make_telemetry: Any) -> None:
        waypost_peer.deliver()
        tel = waypost_make_telemetry(
            sinks={"dest": {"type": self.sink_type, **waypost_peer.config()}}
        )
        for i in range(25):
            tel.track("contract_event", {"i": i})
        assert tel.flush(timeout=20)
        arrived = waypost_peer.received()
        ids = [a.id for a in arrived]
        assert len(ids) == 25 and len(set(ids)) == 25, ids
        assert {a.name for a in arrived if a.name is not None} <= {"contract_event"}
        numbers = sorted(a.properties["i"] for a in arrived if a.properties is not None)
        assert numbers in ([], list(range(25))), numbers
        status = tel.status()
        assert status.sinks[0].delivered == 25

    def test_contract_failure_is_isolated(
        self, waypost_peer: Peer, waypost_make_telemetry: Any, tmp_path: Path
    ) -> None:
        out = tmp_path / "isolated.jsonl"
        tel = waypost_make_telemetry(
            sinks={
                "down": {"type": self.sink_type, **waypost_peer.unreachable_config(), "timeout": 1},
                "file": {"type": "jsonl", "path": str(out)},
            }
        )
        for i in range(10):
            tel.track("isolated_event", {"i": i})
        tel.flush(timeout=10)
        lines = out.read_text().splitlines() if out.exists() else []
        assert len(lines) == 10
        by_name = {s.name: s for s in tel.status().sinks}
        assert by_name["down"].pending == 10
        assert by_name["down"].delivered == 0


def _assert_arrived(arrived: Sequence[Arrival], events: Sequence[Any]) -> None:
    """Each event arrived once, with its name and properties where the peer can tell."""
    assert sorted(a.id for a in arrived) == sorted(e.id for e in events), arrived
    sent = {e.id: e for e in events}
    for arrival in arrived:
        event = sent[arrival.id]
        if arrival.name is not None:
            assert arrival.name == event.name, (arrival, event.name)
        if arrival.properties is not None:
            lost = {k: v for k, v in event.properties.items() if arrival.properties.get(k) != v}
            assert not lost, f"properties lost or changed on the way: {lost} in {arrival}"


def _name(peer: Peer) -> str:
    return str(getattr(peer, "name", "") or "the peer")


def _skip(reason: str) -> None:
    import pytest

    pytest.skip(reason)
