"""Resources that belong to one process: a forked child builds its own and never uses, closes
or shuts down what it inherited (a pre-fork server's master and workers would otherwise share
keep-alive connections, and answers would reach the wrong process).

The fork bookkeeping is :mod:`waypost.processes`'s: each :class:`ProcessLocal` follows forks
there, and what a child inherited goes to :data:`~waypost.processes.FORK_KEEP`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from waypost.processes import FORK_KEEP, follow_forks

__all__ = ["ProcessLocal", "keep_forever"]

T = TypeVar("T")


class ProcessLocal(Generic[T]):
    """A value built on first use in each process, from ``build`` (thread-safe).

    ``close()`` closes the value of the calling process only, with ``close_value``; in a forked
    child the parent's value is left alone (kept referenced, so that not even the garbage
    collector closes a socket the parent still uses), and ``get()`` builds the child's own.
    """

    def __init__(self, build: Callable[[], T], close_value: Callable[[T], object]) -> None:
        self._build = build
        self._close_value = close_value
        self._lock = threading.Lock()
        self._value: T | None = None
        self._pid = 0
        follow_forks(self)

    def get(self) -> T:
        value, pid = self._value, self._pid
        if value is not None and pid == os.getpid():
            return value
        with self._lock:
            if self._value is None or self._pid != os.getpid():
                self._forget()
                self._value, self._pid = self._build(), os.getpid()
            return self._value

    def open(self) -> None:
        """Build this process's value now, if it has none."""
        self.get()

    @property
    def built(self) -> bool:
        """Whether this process has its own value now."""
        return self._value is not None and self._pid == os.getpid()

    def close(self) -> None:
        with self._lock:
            value, mine = self._value, self._pid == os.getpid()
            self._value, self._pid = None, 0
        if value is not None:
            if mine:
                self._close_value(value)
            else:
                FORK_KEEP.append(value)

    def _forget(self) -> None:
        """Drop an inherited value without closing it."""
        if self._value is not None and self._pid != os.getpid():
            FORK_KEEP.append(self._value)
            self._value, self._pid = None, 0

    # waypost.processes calls these around every fork().
    def _before_fork(self) -> None:
        pass

    def _after_fork_in_parent(self) -> None:
        pass

    def _after_fork_in_child(self) -> None:
        # The lock may have been held by a thread that does not exist in the child.
        self._lock = threading.Lock()
        self._forget()


def keep_forever(value: object) -> None:
    """Keep ``value``, a client or producer a forked child inherited, unused for the life of
    the process: in :data:`~waypost.processes.FORK_KEEP`, with one reference more than the
    list's, so that not even interpreter teardown frees it (freeing it would close the
    parent's connections, or join threads that only exist in the parent)."""
    FORK_KEEP.append(value)
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(value))
    except (AttributeError, ImportError, OSError):  # no C API (PyPy): the list keeps it
        pass
