"""Instructions from the receiving side: the ``control`` block a collector sends with its
answers (``heartbeat_every``, ``sample``, ``pause_until``), kept in the data dir and applied.

A control can only make this installation send less, or less often, than its own config
allows: it never turns telemetry on, never widens what is collected, never makes the heartbeat
more frequent. Values that would do more, or that cannot be read, are ignored.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from waypost.datadir import atomic_write

FILENAME = "control.json"


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _share(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 <= value <= 1 else None


def _moment(value: Any) -> float | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        moment = _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


_LATEST = _dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=_dt.timezone.utc).timestamp()


def _timestamp(value: Any) -> float | None:
    """A moment as ``control.json`` keeps it, seconds since the epoch, or None when it is not
    one a date can show: a file edited by hand or damaged may hold anything (``Infinity``,
    ``NaN``, a negative or huge number, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 <= value <= _LATEST else None  # NaN compares false too


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    try:
        when = _dt.datetime.fromtimestamp(moment, _dt.timezone.utc)
    except (OverflowError, OSError, ValueError):  # not a date (built in code, not read)
        return None
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Control:
    """The last control block received: what it says, which sink brought it, and when."""

    heartbeat_every: float | None = None
    sample: float | None = None
    pause_until: float | None = None
    source: str = ""
    received_at: float = 0.0

    @classmethod
    def parse(cls, data: Any, *, source: str, now: float | None = None) -> Control | None:
        """The block as a destination sent it (a JSON object); None if it says nothing."""
        if not isinstance(data, Mapping):
            return None
        control = cls(
            heartbeat_every=_seconds(data.get("heartbeat_every")),
            sample=_share(data.get("sample")),
            pause_until=_moment(data.get("pause_until")),
            source=str(source)[:200],
            received_at=time.time() if now is None else now,
        )
        return control

    # --- applying ---------------------------------------------------------------------------

    def paused(self, now: float | None = None) -> bool:
        """True while ``pause_until`` is ahead: nothing is sent then."""
        return self.pause_until is not None and (time.time() if now is None else now) < (
            self.pause_until
        )

    def paused_for(self, now: float | None = None) -> float:
        """Seconds left of the pause (0 when not paused)."""
        if self.pause_until is None:
            return 0.0
        return max(0.0, self.pause_until - (time.time() if now is None else now))

    def keeps(self, event_id: str, *, heartbeat: bool = False) -> bool:
        """Whether ``sample`` keeps this event. The choice comes from the id's random bits, so
        an event retried is kept or dropped alike; heartbeats are not sampled."""
        if heartbeat or self.sample is None or self.sample >= 1:
            return True
        if self.sample <= 0:
            return False
        try:
            bits = int(event_id.replace("-", "")[-8:], 16)
        except ValueError:
            return True
        return bits / 0x1_0000_0000 < self.sample

    def heartbeat_period(self, own: float) -> float:
        """The heartbeat period: this installation's own, or the control's when longer."""
        every = self.heartbeat_every
        return max(own, every) if every is not None else own

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("pause_until", "received_at"):
            data[key] = _iso(data[key])
        return data

    # --- the data dir ---------------------------------------------------------------------

    def write(self, data_dir: Path) -> None:
        atomic_write(Path(data_dir) / FILENAME, json.dumps(asdict(self)).encode(), mode=0o600)

    @classmethod
    def read(cls, data_dir: Path) -> Control | None:
        try:
            raw = json.loads((Path(data_dir) / FILENAME).read_text(encoding="utf-8"))
            return cls(
                heartbeat_every=_seconds(raw.get("heartbeat_every")),
                sample=_share(raw.get("sample")),
                pause_until=_timestamp(raw.get("pause_until")),
                source=str(raw.get("source", ""))[:200],
                received_at=_timestamp(raw.get("received_at")) or 0.0,
            )
        except (OSError, ValueError, TypeError, AttributeError):
            return None


class ControlState:
    """The control in force for one data dir: read at start, replaced by each new block
    (and written back), read by the worker once per batch."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._lock = threading.Lock()
        self.current: Control | None = Control.read(self.data_dir)
        self.listeners: list[Callable[[Control], None]] = []

    def paused_for(self) -> float:
        current = self.current
        return current.paused_for() if current is not None else 0.0

    def receive(self, data: Any, *, source: str) -> Control | None:
        """Take a block a sink's destination sent; returns it if it was readable."""
        control = Control.parse(data, source=source)
        if control is None:
            return None
        with self._lock:
            same = self.current is not None and (
                (self.current.heartbeat_every, self.current.sample, self.current.pause_until)
                == (control.heartbeat_every, control.sample, control.pause_until)
            )
            self.current = control
        if not same:  # written when it changes, not with every answer
            try:
                control.write(self.data_dir)
            except OSError:
                pass
            for listener in self.listeners:
                listener(control)
        return control
