"""Events per second through one clickhouse sink into the embedded engine (not a test; run it
with ``uv run python plugins/clickhouse/tests/throughput.py``)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from waypost_clickhouse import ClickHouseConfig, ClickHouseSink

from waypost.sinks import SinkContext
from waypost.testing import make_events

BATCHES, SIZE = 20, 5000


def main() -> None:
    with tempfile.TemporaryDirectory() as data:
        context = SinkContext(app="bench", version="1", instance_id="i", data_dir=Path(data))
        sink = ClickHouseSink("bench", ClickHouseConfig(), context)
        sink.open()
        sink.send(make_events(10))  # the first insert loads what clickhouse-connect needs
        batches = [make_events(SIZE, name=f"event_{i % 4}") for i in range(BATCHES)]
        start = time.perf_counter()
        for batch in batches:
            result = sink.send(batch)
            assert not result.retry and not result.failed, result
        elapsed = time.perf_counter() - start
        sink.close()
        total = BATCHES * SIZE
        print(
            f"clickhouse sink (chdb): {total / elapsed:,.0f} events/s "
            f"({total:,} in batches of {SIZE})"
        )


if __name__ == "__main__":
    main()
