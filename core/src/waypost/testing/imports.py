"""What a sink imports on the delivery path, measured in a fresh interpreter.

The core calls ``open()``, ``send()`` and ``close()`` on delivery threads, and a ``fork()``
that catches a thread halfway through an import leaves that module's lock held in the child
for good: a sink imports what it needs in ``__init__``, on the thread that builds it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["delivery_imports"]

_SCRIPT = r"""
import json, sys, warnings
from pathlib import Path

warnings.simplefilter("ignore", DeprecationWarning)  # a deprecated sink still imports
from waypost.plugins import PluginManager
from waypost.sinks import SinkContext
from waypost.testing import INSTANCE_ID, make_events

sink_type, settings, data_dir, count = json.loads(sys.stdin.read())
cls = PluginManager().load_sink_type(sink_type)
context = SinkContext(
    app="testapp", version="1.0.0", instance_id=INSTANCE_ID, data_dir=Path(data_dir), strict=True
)
sink = cls(f"imports-{sink_type}", cls.Config.model_validate(settings), context)
events = make_events(count)
built = set(sys.modules)
sink.open()
try:
    result = sink.send(events)
finally:
    sink.close()
print(json.dumps({
    "imported": sorted(set(sys.modules) - built),
    "undelivered": {**result.retry, **result.failed},
}))
"""


def delivery_imports(
    sink_type: str,
    settings: dict[str, Any],
    data_dir: Path,
    *,
    events: int = 1,
    timeout: float = 120.0,
) -> list[str]:
    """The modules a ``sink_type`` sink with ``settings`` (plain JSON values) imports in
    ``open()``, ``send()`` of ``events`` events and ``close()``, built, opened and used in a
    fresh interpreter (so that nothing was imported before). The destination must accept the
    events (the recording server of the calling test serves the child too): an
    ``AssertionError`` says why it did not. A sink that follows the contract returns ``[]``::

        assert delivery_imports("acme", {"api_key": "k", "host": server.url}, tmp_path) == []
    """
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        input=json.dumps([sink_type, settings, str(data_dir), events]),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"the {sink_type} sink failed in a new interpreter: {done.stderr}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["undelivered"], f"the destination did not accept: {report['undelivered']}"
    imported: list[str] = report["imported"]
    return imported
