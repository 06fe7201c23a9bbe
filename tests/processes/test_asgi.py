"""uvicorn and hypercorn with a FastAPI app, stopped by SIGTERM or SIGINT while requests are
under way: nothing tracked is lost. uvicorn re-raises SIGTERM with the default handler after
its graceful stop, so atexit never runs there: waypost's signal handling keeps what is in
memory (stored, for the next run), and the ASGI lifespan integration delivers it at shutdown."""

from __future__ import annotations

import signal
from pathlib import Path

import harness
import pytest
from conftest import need

from waypost.testing import RecordingServer

pytestmark = pytest.mark.server

REQUESTS = 2000
SERVERS = {"uvicorn": harness.uvicorn_argv, "hypercorn": harness.hypercorn_argv}


def delivered_after_restart(result: harness.Count, data: Path, env: dict[str, str]) -> set[str]:
    """What the next run delivers of the events the stopped server left stored."""
    if not result.stored:
        return set()
    with RecordingServer() as ingest:
        assert harness.deliver_stored(f"{ingest.url}/ingest", data, env)
        return set(harness.rids(ingest))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("server", SERVERS)
def test_a_signal_during_load_loses_nothing(
    server: str, sig: signal.Signals, tmp_path: Path, env: dict[str, str]
) -> None:
    need(server, "fastapi")
    result = harness.run_server(
        SERVERS[server], tmp_path, requests=REQUESTS, sig=sig, during_load=True
    )
    summary = result.summary()
    assert len(result.served) >= REQUESTS // 2, summary
    assert not result.lost, summary
    assert result.duplicate_ids == 0, summary
    assert result.stop_seconds < 10, summary
    later = delivered_after_restart(result, tmp_path / "data", env)
    assert result.served <= set(result.delivered) | later, summary


@pytest.mark.parametrize("server", SERVERS)
def test_the_lifespan_integration_delivers_at_shutdown(server: str, tmp_path: Path) -> None:
    need(server, "fastapi")
    result = harness.run_server(
        SERVERS[server],
        tmp_path,
        requests=REQUESTS,
        during_load=True,
        env_extra={"PROC_LIFESPAN": "1"},
    )
    summary = result.summary()
    assert not result.lost, summary
    assert set(result.delivered) >= result.served, summary  # delivered, not merely stored
    assert result.duplicate_ids == 0, summary
