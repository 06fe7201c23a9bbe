"""A sink's queue in memory: events in order, and when each group of them got there.

The arrival time is kept once per group offered together, never per event: each of the tens of
thousands of events a burst leaves waiting in memory is then one object for the garbage
collector to visit (the event), with no ``(time, event)`` pair besides it, and every full
collection the host goes through meanwhile is shorter by as much.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from waypost.events import Event


@dataclass(eq=False)
class Taken:
    """Events taken from the front of a :class:`Waiting` queue, with their arrival marks:
    ``(time, count)`` for each run of events that got there at one time, oldest first."""

    events: list[Event] = field(default_factory=list)
    marks: list[tuple[float, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.events)

    @classmethod
    def since(cls, since: float, events: list[Event]) -> Taken:
        """``events``, all of them there since ``since``."""
        return cls(events, [(since, len(events))] if events else [])


class Waiting:
    """Events waiting in memory, oldest first, with their arrival times (monotonic) kept per
    group: a deque of events and a deque of ``(time, count)`` marks. The runner changes it only
    under its ``_state`` lock (the events and their mark go in and out together)."""

    __slots__ = ("_events", "_marks")

    def __init__(self) -> None:
        self._events: deque[Event] = deque()
        self._marks: deque[tuple[float, int]] = deque()

    def __len__(self) -> int:
        return len(self._events)

    def __bool__(self) -> bool:
        return bool(self._events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    def oldest(self) -> float:
        """When the event at the front got there (``IndexError`` when there is none)."""
        return self._marks[0][0]

    def add(self, events: list[Event], now: float) -> None:
        """Put ``events``, there since ``now``, at the back."""
        if events:
            self._events.extend(events)
            self._marks.append((now, len(events)))

    def take(self, most: int, older_than: float | None = None) -> Taken:
        """Take up to ``most`` events from the front (only those there since ``older_than``
        or before, when given)."""
        taken = Taken()
        marks, pop = self._marks, self._events.popleft
        left = most
        while left > 0 and marks:
            since, count = marks[0]
            if older_than is not None and since > older_than:
                break
            n = min(count, left)
            if n == count:
                marks.popleft()
            else:
                marks[0] = (since, count - n)
            taken.events += [pop() for _ in range(n)]
            taken.marks.append((since, n))
            left -= n
        return taken

    def put_back(self, taken: Taken) -> None:
        """Put events taken earlier back at the front, in their order, with their times."""
        self._events.extendleft(reversed(taken.events))
        self._marks.extendleft(reversed(taken.marks))

    def clear(self) -> None:
        self._events.clear()
        self._marks.clear()
