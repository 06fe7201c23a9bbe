"""``SinkContract``: the tests every sink must pass. Subclass it in a plugin's tests::

    class TestMySink(SinkContract):
        sink_type = "mysink"
        secret_fields = ("api_key",)

        def config(self, url):
            return {"api_key": "secret-123", "host": url}

        def received_ids(self, requests):
            return [e["uuid"] for r in requests for e in r.json()["batch"]]

Override ``ok_response`` when the destination's success answer is not ``200 {}``, and set
``permanent_status`` / ``retry_statuses`` / ``honours_retry_after`` where the destination differs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import pytest

    from waypost.sinks import Sink
    from waypost.testing.server import RecordingServer, Request, Response


class SinkContract:
    """Contract tests for a sink type; subclasses fill in the destination's specifics."""

    sink_type: ClassVar[str] = ""
    secret_fields: ClassVar[tuple[str, ...]] = ()
    permanent_status: ClassVar[int] = 400
    retry_statuses: ClassVar[tuple[int, ...]] = (429, 503)
    honours_retry_after: ClassVar[bool] = True
    needs_server: ClassVar[bool] = True

    # --- what a subclass provides -----------------------------------------------------------

    def config(self, url: str) -> dict[str, Any]:
        """Settings of the sink pointing at ``url`` (the recording server's base URL)."""
        raise NotImplementedError

    def received_ids(self, requests: list[Request]) -> list[str]:
        """Event ids the destination received, one entry per copy, in any order."""
        raise NotImplementedError

    def ok_response(self, request: Request) -> Response:
        """The destination's success answer to ``request``."""
        from waypost.testing.server import Response

        return Response(200, {})

    def error_response(self, request: Request, status: int, headers: dict[str, str]) -> Response:
        """The destination's answer with an error ``status``."""
        from waypost.testing.server import Response

        return Response(status, {"error": f"status {status}"}, headers=headers)

    # --- helpers ------------------------------------------------------------------------------

    def make_sink(self, url: str, tmp_path: Path, **overrides: Any) -> Sink:
        from waypost.plugins import PluginManager
        from waypost.sinks import SinkContext

        cls = PluginManager().load_sink_type(self.sink_type)
        config = cls.Config.model_validate({**self.config(url), **overrides})
        context = SinkContext(
            app="testapp",
            version="1.0.0",
            instance_id="5db51f99-c6fb-4340-9c19-78adce58cc1b",
            data_dir=tmp_path,
            strict=True,
        )
        return cls(f"test-{self.sink_type}", config, context)

    def _secrets(self, url: str, tmp_path: Path) -> list[str]:
        """The values named in ``secret_fields`` and every ``SecretStr`` in the config model."""
        from pydantic import BaseModel, SecretStr

        config = self.config(url)
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

        walk(self.make_sink(url, tmp_path).config)
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

    def test_contract_config_refuses_unknown_keys(self, recording_server: RecordingServer) -> None:
        from pydantic import ValidationError

        from waypost.plugins import PluginManager

        cls = PluginManager().load_sink_type(self.sink_type)
        good = self.config(recording_server.url)
        cls.Config.model_validate(good)
        try:
            cls.Config.model_validate({**good, "no_such_setting": 1})
        except ValidationError as exc:
            assert "no_such_setting" in str(exc)
        else:
            raise AssertionError("an unknown config key was accepted")

    def test_contract_delivers_a_batch(
        self, recording_server: RecordingServer, tmp_path: Path
    ) -> None:
        from waypost.testing import make_events, send_batch

        self._serve_ok(recording_server, self)
        sink = self.make_sink(recording_server.url, tmp_path)
        sink.open()
        try:
            events = make_events(5)
            result = send_batch(sink, events)
            assert not result.retry and not result.failed, result
            received = self.received_ids(recording_server.requests)
            assert sorted(received) == sorted(e.id for e in events)
        finally:
            sink.close()

    def test_contract_retryable_answers(
        self, recording_server: RecordingServer, tmp_path: Path
    ) -> None:
        from waypost.testing import make_events, send_batch

        sink = self.make_sink(recording_server.url, tmp_path)
        sink.open()
        try:
            for status in self.retry_statuses:
                recording_server.responder = lambda r, s=status: self.error_response(  # type: ignore[misc]
                    r, s, {"Retry-After": "7"}
                )
                events = make_events(3)
                result = send_batch(sink, events)
                assert set(result.retry) == {e.id for e in events}, (status, result)
                assert not result.failed
                if self.honours_retry_after:
                    assert result.retry_after == 7, (status, result.retry_after)
        finally:
            sink.close()

    def test_contract_permanent_answer(
        self, recording_server: RecordingServer, tmp_path: Path
    ) -> None:
        from waypost.testing import make_events, send_batch

        recording_server.responder = lambda r: self.error_response(r, self.permanent_status, {})
        sink = self.make_sink(recording_server.url, tmp_path)
        sink.open()
        try:
            events = make_events(3)
            result = send_batch(sink, events)
            assert set(result.failed) == {e.id for e in events}, result
            assert all(reason for reason in result.failed.values())
        finally:
            sink.close()

    def test_contract_unreachable_is_retryable(self, tmp_path: Path) -> None:
        from waypost.testing import free_port, make_events, send_batch

        sink = self.make_sink(f"http://127.0.0.1:{free_port()}", tmp_path, timeout=2)
        try:
            sink.open()
            events = make_events(2)
            result = send_batch(sink, events)
            assert set(result.retry) == {e.id for e in events}, result
        finally:
            sink.close()

    def test_contract_slow_answer_times_out(
        self, recording_server: RecordingServer, tmp_path: Path
    ) -> None:
        from waypost.testing import make_events, send_batch
        from waypost.testing.server import Response

        recording_server.responder = lambda r: Response(200, {}, delay=3.0)
        sink = self.make_sink(recording_server.url, tmp_path, timeout=0.5)
        sink.open()
        try:
            events = make_events(2)
            result = send_batch(sink, events)
            assert set(result.retry) == {e.id for e in events}, result
        finally:
            sink.close()

    def test_contract_never_logs_secrets(
        self,
        recording_server: RecordingServer,
        tmp_path: Path,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        from waypost.testing import free_port, make_events, send_batch

        secrets = self._secrets(recording_server.url, tmp_path)
        caplog.set_level(logging.DEBUG)
        texts: list[str] = []
        for responder in (self.ok_response, lambda r: self.error_response(r, 401, {})):
            recording_server.responder = responder
            sink = self.make_sink(recording_server.url, tmp_path)
            sink.open()
            result = send_batch(sink, make_events(2))
            texts += [repr(sink), str(sink.config), repr(sink.config), repr(result)]
            sink.close()
        sink = self.make_sink(f"http://127.0.0.1:{free_port()}", tmp_path, timeout=1)
        sink.open()
        texts.append(repr(send_batch(sink, make_events(1))))
        sink.close()
        texts.append(caplog.text)
        for secret in secrets:
            for text in texts:
                assert secret not in text, f"a secret leaked into: {text[:200]}"

    def test_contract_close_is_clean(
        self, recording_server: RecordingServer, tmp_path: Path
    ) -> None:
        from waypost.testing import make_events, send_batch

        self._serve_ok(recording_server, self)
        sink = self.make_sink(recording_server.url, tmp_path)
        sink.open()
        send_batch(sink, make_events(1))
        sink.close()
        sink.close()  # twice is harmless

    def test_contract_end_to_end(
        self, recording_server: RecordingServer, make_telemetry: Any
    ) -> None:
        self._serve_ok(recording_server, self)
        tel = make_telemetry(
            sinks={"dest": {"type": self.sink_type, **self.config(recording_server.url)}}
        )
        for i in range(25):
            tel.track("contract_event", {"i": i})
        assert tel.flush(timeout=20)
        received = self.received_ids(recording_server.requests)
        assert len(received) == 25 and len(set(received)) == 25, received
        status = tel.status()
        assert status.sinks[0].delivered == 25

    def test_contract_failure_is_isolated(self, make_telemetry: Any, tmp_path: Path) -> None:
        from waypost.testing import free_port

        down = f"http://127.0.0.1:{free_port()}"
        out = tmp_path / "isolated.jsonl"
        tel = make_telemetry(
            sinks={
                "down": {"type": self.sink_type, **self.config(down), "timeout": 1},
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
