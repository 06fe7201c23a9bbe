"""How waypost follows its host's processes: ``fork()`` at any moment, ``multiprocessing``
children that end with ``os._exit``, a SIGTERM that ends a server, and which process holds a
lease on outbox rows.

**fork.** A child inherits memory, not threads: a lock that one of waypost's threads held at that
instant stays held for good in the child. Python's own locks are replaced in the child (each
object's ``_after_fork``), but SQLite keeps its lock state in C (a connection in the middle of a
transaction leaves the child's connections waiting for a writer that does not exist there) and
an import under way leaves its module lock held. So the sections that must not be forked across
(every use of the outbox's SQLite, a sink's ``open()``, where clients are built and modules
imported) pass the :data:`GATE`, and ``fork()`` waits for them to end, :data:`FORK_WAIT` seconds
at most, before it forks. The child starts its own threads and makes its own sink instances
(their connections are the parent's), and never sends what the parent had buffered.

**multiprocessing.** Its children end with ``os._exit`` (fork and forkserver), so ``atexit``
never runs there; its own finalizers do, and waypost registers one in each child.

**SIGTERM.** See :func:`install_sigterm`.

:class:`ProcessHooks` registers one instance's work for all of these at once, and forgets it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger("waypost")

FORK_WAIT = 1.0
"""Seconds ``fork()`` waits at most for waypost's threads to leave the sections that must not be
forked across: a transaction on the outbox (milliseconds) or a sink's ``open()``."""

FORK_HOLD = 60.0
"""Seconds a thread waits at most to enter a section while a fork is under way. The fork ends
within :data:`FORK_WAIT` and the fork itself (its after-fork hook always runs in the parent, the
child starts afresh), so the bound is reached only if another library's fork hook hangs; a
thread let in earlier would be inside SQLite at the instant of the fork."""


class ForkGate:
    """Sections that must not be forked across. Any number of threads may be inside at once; a
    fork waits until none is (at most :data:`FORK_WAIT`), and new entries wait for the fork."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._inside = 0
        self._forking = False
        self._mine = threading.local()  # sections entered by this thread (they nest)
        self._what: dict[int, str] = {}  # thread -> what its outermost section does
        self.busy_at_fork: list[str] = []

    @contextlib.contextmanager
    def section(self, what: str) -> Iterator[None]:
        """``what`` names the section for the warning of a fork that could not wait for it."""
        mine = self._mine
        depth = getattr(mine, "depth", 0)
        cond = self._cond
        me = threading.get_ident()
        with cond:
            if not depth:
                # A fork is under way: held back until it is done, however long the fork
                # waited for others (a thread let in now would be inside at the fork).
                cond.wait_for(lambda: not self._forking, timeout=FORK_HOLD)
                self._what[me] = what
            self._inside += 1
        mine.depth = depth + 1
        try:
            yield
        finally:
            mine.depth = depth
            if cond is self._cond:  # not entered before a fork that left this thread in a child
                with cond:
                    self._inside -= 1
                    if not depth:
                        self._what.pop(me, None)
                    if not self._inside:
                        cond.notify_all()

    def before_fork(self) -> None:
        own = getattr(self._mine, "depth", 0)  # the forking thread may be inside one itself
        with self._cond:
            self._forking = True
            self._cond.wait_for(lambda: self._inside <= own, timeout=FORK_WAIT)
            me = threading.get_ident()
            self.busy_at_fork = [w for t, w in self._what.items() if t != me]

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        busy = self.busy_at_fork
        self._reset()  # the parent's threads are not here: nobody is inside
        self.busy_at_fork = busy


GATE = ForkGate()
"""The process's gate: :meth:`ForkGate.section` around SQLite and sink ``open()`` calls."""


class Forkable(Protocol):
    def _before_fork(self) -> None: ...
    def _after_fork_in_parent(self) -> None: ...
    def _after_fork_in_child(self) -> None: ...


_FORKABLE: weakref.WeakSet[Any] = weakref.WeakSet()
FORK_KEEP: list[Any] = []
"""What a child must never close or use: the parent's connections and sink instances (their
finalizers would close sockets the parent still uses)."""


def follow_forks(obj: Forkable) -> None:
    """Call ``obj``'s ``_before_fork``, ``_after_fork_in_parent`` and ``_after_fork_in_child``
    around every ``os.fork()`` for as long as it lives."""
    _FORKABLE.add(obj)


def forget_forks(obj: Forkable) -> None:
    _FORKABLE.discard(obj)


def _each(method: str) -> None:
    for obj in list(_FORKABLE):
        try:
            getattr(obj, method)()
        except Exception as exc:  # never break the host's fork
            log.warning("waypost: %s failed around fork(): %s: %s", method, type(exc).__name__, exc)


def _before() -> None:
    GATE.before_fork()
    _each("_before_fork")


def _after_in_parent() -> None:
    GATE.after_fork_in_parent()
    _each("_after_fork_in_parent")


def _after_in_child() -> None:
    global _OWNER
    GATE.after_fork_in_child()
    _OWNER = None
    _each("_after_fork_in_child")
    if GATE.busy_at_fork:
        log.warning(
            "waypost: fork() went ahead after %g s while waypost's threads were still busy "
            "(%s); this child may wait for the outbox",
            FORK_WAIT,
            ", ".join(GATE.busy_at_fork),
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before, after_in_parent=_after_in_parent, after_in_child=_after_in_child
    )


_warm = False


def warm_imports() -> None:
    """Import now, inside the gate, what a sink's first connection imports lazily (the codec
    that encodes host names): a fork during that import would leave its lock held for good in
    the child."""
    global _warm
    if not _warm:
        import encodings.idna  # noqa: F401

        _warm = True


# --- multiprocessing ---------------------------------------------------------------------------


def in_multiprocessing_child() -> bool:
    """Whether this process is a ``multiprocessing`` child (without importing the package)."""
    mp = sys.modules.get("multiprocessing")
    return mp is not None and mp.parent_process() is not None


def at_multiprocessing_exit(obj: Any, callback: Callable[[Any], None]) -> None:
    """Run ``callback(obj)`` when a ``multiprocessing`` child ends, before its ``os._exit``: now
    if this is such a child, and in every child forked from here later (``multiprocessing``
    clears the parent's finalizers in each child, then runs its after-fork callbacks)."""
    util = sys.modules.get("multiprocessing.util")
    if util is None:
        return  # without multiprocessing there are no such children (checked again at fork)
    ref = weakref.ref(obj)

    def finalize() -> None:
        target = ref()
        if target is not None:
            callback(target)

    if in_multiprocessing_child():
        util.Finalize(None, finalize, exitpriority=10)
    marks = obj.__dict__.setdefault("_mp_registered", set())
    if "after_fork" not in marks:
        marks.add("after_fork")
        util.register_after_fork(obj, lambda o: util.Finalize(None, finalize, exitpriority=10))


# --- process identity, for leases ----------------------------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


_BOOT = _boot_id()
_OWNER: str | None = None


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from ``/proc``), or None if there
    is no such process; "" where ``/proc`` does not tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else ""
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: fields are counted after it.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else ""


def owner() -> str:
    """This process as a lease names it: ``pid@start time@boot id``. A new process that got a
    dead one's PID (PID 1 of every container start) has another start time."""
    global _OWNER
    if _OWNER is None:
        pid = os.getpid()
        _OWNER = f"{pid}@{start_time(pid) or ''}@{_BOOT}"
    return _OWNER


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(lease_owner: str, pid: int) -> bool:
    """Whether the process that took a lease still runs. ``lease_owner`` is what
    :func:`owner` gave it ("" for leases written by older versions: then the PID alone)."""
    if not lease_owner:
        return pid != os.getpid() and pid_alive(pid)
    if lease_owner == owner():
        return True
    pid_text, _, rest = lease_owner.partition("@")
    started, _, boot = rest.partition("@")
    if boot and _BOOT and boot != _BOOT:
        return False  # the machine rebooted since
    if not pid_text.isdigit() or int(pid_text) == os.getpid():
        return False  # our PID, another start: a dead process whose PID we got
    now = start_time(int(pid_text))
    if now is None:
        return False
    if started and now:
        return now == started
    return pid_alive(int(pid_text))


# --- SIGTERM -----------------------------------------------------------------------------------

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Stoppable(Protocol):
    @property
    def sigterm_budget(self) -> float: ...
    def _on_sigterm(self, ends_now: bool) -> None: ...


_STOPPABLE: weakref.WeakSet[Any] = weakref.WeakSet()
_previous: Handler = None
_handling = False


def install_sigterm(obj: Stoppable) -> bool:
    """Keep what ``obj`` holds in memory when SIGTERM comes. Installed only from the main thread,
    and only where SIGTERM is not ignored; whatever handler was there is chained:

    - the default one (the process ends at once): ``obj`` delivers what it can within its
      ``shutdown_timeout``, then the process ends by SIGTERM as it would have;
    - the host's own (a server that stops gracefully, which uvicorn ends by raising SIGTERM
      again with the default handler, so atexit never runs): ``obj`` stores what it holds in the
      outbox and keeps storing what is tracked from then on, at once, then the host's handler
      runs. The next start delivers it; ``waypost.integrations`` deliver it at once instead.

    Returns whether the handler is in place.
    """
    global _previous
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        current = signal.getsignal(signal.SIGTERM)
        if current is signal.SIG_IGN:
            return False
        if current is not _on_sigterm:
            signal.signal(signal.SIGTERM, _on_sigterm)
            _previous = current
    except (ValueError, OSError, AttributeError):  # not the main interpreter, or no SIGTERM
        return False
    _STOPPABLE.add(obj)
    return True


def uninstall_sigterm(obj: Stoppable) -> None:
    _STOPPABLE.discard(obj)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _handling
    if _handling:
        return  # a host's handler that chains back to this one
    previous = _previous
    ends_now = previous in (signal.SIG_DFL, None)
    _handling = True
    try:
        # The work runs on a thread while this one (the main thread, interrupted anywhere, perhaps
        # holding a lock the work needs) waits a bounded time.
        stoppable = list(_STOPPABLE)
        budget = max((obj.sigterm_budget for obj in stoppable), default=0.0)

        def work() -> None:
            for obj in stoppable:
                try:
                    obj._on_sigterm(ends_now)
                except Exception as exc:
                    log.warning("waypost: at SIGTERM: %s: %s", type(exc).__name__, exc)

        worker = threading.Thread(target=work, name="waypost-sigterm", daemon=True)
        worker.start()
        worker.join(budget)
    finally:
        _handling = False
    if ends_now:
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)  # ends the process, as it would have ended
    elif callable(previous):
        previous(signum, frame)


# --- one instance's hooks ------------------------------------------------------------------------


_INSTALLED: weakref.WeakSet[ProcessHooks] = weakref.WeakSet()


def installed() -> list[ProcessHooks]:
    """The hooks installed now: one for each instance of this process that is running."""
    return list(_INSTALLED)


class ProcessHooks:
    """What one running instance does at exit (and when a ``multiprocessing`` child ends): shut
    down within its ``budget``; in a forked child: start afresh; at SIGTERM: shut down if the
    process ends now, else keep everything in the outbox from then on (see
    :func:`install_sigterm`). Registered together by :meth:`install`, forgotten together by
    :meth:`forget`; :func:`installed` lists them (``waypost.integrations`` shuts them down)."""

    def __init__(
        self,
        *,
        shutdown: Callable[[float], bool],
        budget: float,
        after_fork_in_child: Callable[[], None],
        keep_everything: Callable[[], None],
    ) -> None:
        self._shutdown = shutdown
        self.sigterm_budget = float(budget)
        self._child = after_fork_in_child
        self._keep = keep_everything

    def install(self, *, sigterm: bool) -> None:
        _INSTALLED.add(self)
        atexit.register(self.at_exit)
        follow_forks(self)
        at_multiprocessing_exit(self, ProcessHooks.at_exit)
        if sigterm:
            install_sigterm(self)

    def forget(self) -> None:
        """No more at-exit, at-fork or SIGTERM work."""
        _INSTALLED.discard(self)
        try:
            atexit.unregister(self.at_exit)
        except Exception:
            pass
        forget_forks(self)
        uninstall_sigterm(self)

    def shutdown(self, timeout: float | None = None) -> bool:
        """Shut the instance down within ``timeout`` seconds (default: its budget)."""
        return self._shutdown(self.sigterm_budget if timeout is None else timeout)

    def at_exit(self) -> None:
        try:
            self.shutdown()
        except Exception as exc:
            log.warning("waypost: shutdown at exit failed: %s", exc)

    # Around fork() (see follow_forks).

    def _before_fork(self) -> None:
        # multiprocessing may have been imported since start: its children get a finalizer.
        at_multiprocessing_exit(self, ProcessHooks.at_exit)

    def _after_fork_in_parent(self) -> None:
        pass

    def _after_fork_in_child(self) -> None:
        self._child()

    def _on_sigterm(self, ends_now: bool) -> None:
        if ends_now:  # the process ends when this returns: deliver what can be, as at exit
            self.at_exit()
        else:
            self._keep()
