"""The data dir: where an instance keeps its outbox, consent, ids and schedule; how it is found,
the installation's random id, the record that lets the CLI find an application's data dir from
its config file, and the one way a file in it is replaced (:func:`atomic_write`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from waypost.logs import get_logger

if TYPE_CHECKING:
    from waypost.config import TelemetryConfig

log = get_logger(__name__)

INSTANCE_ID_FILE = "instance_id"


def atomic_write(
    path: Path, data: str | bytes, *, mode: int | None = None, exclusive: bool = False
) -> bool:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new one, never
    a part, even across a crash: a temporary file unique to this process and thread, flushed to
    disk, then renamed over ``path``.

    ``mode`` sets the file's permissions exactly (``0o600`` for a secret); None leaves them to
    the umask, as ``open()`` does. ``exclusive`` never replaces an existing file: it returns
    False when ``path`` is already there (another process won the race), True otherwise.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(
        f".{path.name}.{os.getpid()}.{threading.get_ident()}.{secrets.token_hex(4)}"
    )
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
    try:
        try:
            if mode is not None:
                with contextlib.suppress(AttributeError, OSError):  # no fchmod on Windows
                    os.fchmod(fd, mode)  # the umask may have taken bits away
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if not exclusive:
            os.replace(tmp, path)
            _sync_dir(path.parent)
            return True
        try:
            os.link(tmp, path)  # fails if the file exists: the first writer wins
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network and FUSE file systems)
            if path.exists():
                return False
            os.replace(tmp, path)
        _sync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _sync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be
    opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- where the data dir is ----------------------------------------------------------------------


def default_data_dir(app: str) -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("waypost", appauthor=False)) / app


@dataclass(frozen=True)
class Location:
    """The application name and data dir an instance uses, and what decided the data dir:
    ``argument``, ``WAYPOST_HOME``, ``config``, ``recalled`` (the installation record) or
    ``default``."""

    app: str
    data_dir: Path
    source: str


def locate(
    *,
    app: str | None,
    data_dir: str | os.PathLike[str] | None,
    config: TelemetryConfig,
    config_file: str | None,
    env: Mapping[str, str],
) -> Location:
    """Find the data dir: the argument, ``WAYPOST_HOME``, ``telemetry.data_dir`` (relative to
    the config file), the record of the application that used this config file, the default."""
    from_file = config_file not in (None, "<config>")
    env_home = env.get("WAYPOST_HOME")
    recalled = None
    if not (app or config.app or data_dir or config.data_dir or env_home):
        # An inspecting process (the CLI) with only the config file: use the data dir the
        # application itself used with this file, if it has run here.
        recalled = recall_installation(str(config_file)) if from_file else None
    name = app or config.app or (recalled or {}).get("app") or "app"
    configured = config.data_dir.expanduser() if config.data_dir else None
    if configured is None and recalled is not None:
        configured = Path(recalled["data_dir"])
    source = (
        "argument" if data_dir else "WAYPOST_HOME" if env_home
        else "config" if config.data_dir else "recalled" if recalled
        else "default"
    )  # fmt: skip
    if configured is not None and not configured.is_absolute() and from_file:
        configured = Path(str(config_file)).resolve().parent / configured
    path = Path(data_dir or env_home or configured or default_data_dir(name)).expanduser()
    return Location(name, path, source)


# --- the installation record ------------------------------------------------------------------


def installations_file() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("waypost", appauthor=False)) / "installations.json"


def recall_installation(config_file: str) -> dict[str, str] | None:
    """The app name and data dir an application last used with this config file, so that
    ``waypost --config FILE`` works on the application's own data dir."""
    try:
        known = json.loads(installations_file().read_text(encoding="utf-8"))
        entry = known.get(str(Path(config_file).resolve()))
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) and entry.get("data_dir") else None


def recall_app(app: str) -> tuple[str, dict[str, str]] | None:
    """The config file (and its entry) an application named ``app`` last ran with here, so
    that ``waypost --app NAME`` works from any directory."""
    try:
        known = json.loads(installations_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(known, dict):
        return None
    found = [
        (float(entry.get("at", 0)), config_file, entry)
        for config_file, entry in known.items()
        if isinstance(entry, dict) and entry.get("app") == app and entry.get("data_dir")
    ]
    if not found:
        return None
    _, config_file, entry = max(found, key=lambda item: item[0])
    return config_file, entry


def remember_installation(config_file: str, app: str, data_dir: Path) -> None:
    """Note, per user, which app name and data dir this config file serves (written when it
    changes: the CLI reads it to find the application's records)."""
    import time

    path = installations_file()
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(known, dict):
            known = {}
    except (OSError, ValueError):
        known = {}
    key = str(Path(config_file).resolve())
    entry = {"app": app, "data_dir": str(data_dir.resolve())}
    old = known.get(key)
    if isinstance(old, dict) and {k: old.get(k) for k in entry} == entry:
        return
    known[key] = {**entry, "at": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(known, indent=1))
    except OSError as exc:
        log.debug("waypost: cannot record the installation: %s", exc)


# --- what the application leaves in its data dir for the CLI ---------------------------------

INSTALLATION_FILE = "installation.json"
"""The application's name, version and config file, and the heartbeat facts it gave last:
what a heartbeat or test event sent by the CLI (another process, perhaps cron) carries."""


def read_installation(data_dir: Path) -> dict[str, Any]:
    """The record the application left in ``data_dir`` (empty if none or unreadable)."""
    try:
        data = json.loads((data_dir / INSTALLATION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_installation(data_dir: Path, **fields: Any) -> None:
    """Update the record in ``data_dir`` with ``fields`` (None values are left out); the file
    is written only when something changed."""
    record = read_installation(data_dir)
    updated = {**record, **{k: v for k, v in fields.items() if v is not None}}
    if updated == record:
        return
    try:
        atomic_write(data_dir / INSTALLATION_FILE, json.dumps(updated, indent=1), mode=0o600)
    except (OSError, TypeError, ValueError) as exc:
        log.debug("waypost: cannot write %s: %s", INSTALLATION_FILE, exc)


# --- the instance id --------------------------------------------------------------------------


def read_instance_id(data_dir: Path) -> str | None:
    """The stored instance id, or None if there is none or it is not one (junk bytes, an empty
    file, a directory: whatever is there, this never raises)."""
    try:
        with open(data_dir / INSTANCE_ID_FILE, "rb") as fh:
            raw = fh.read(256)
        value = raw.decode("utf-8").strip()
    except (OSError, ValueError):
        return None
    if not value or len(value) > 128 or not value.isprintable():
        return None
    return value


def ensure_instance_id(data_dir: Path) -> str:
    """The installation's random id: created once (atomically, even with several processes).
    A file that holds no id (junk, empty) is replaced."""
    import uuid

    existing = read_instance_id(data_dir)
    if existing:
        return existing
    path = data_dir / INSTANCE_ID_FILE
    if os.path.lexists(path) and path.is_file():
        log.warning("waypost: %s holds no instance id; a new one replaces it", path)
        atomic_write(path, str(uuid.uuid4()))
    else:
        atomic_write(path, str(uuid.uuid4()), exclusive=True)
    value = read_instance_id(data_dir)
    if not value:
        raise OSError(f"cannot create {path}")
    return value


def instance_id_or_temporary(data_dir: Path) -> tuple[str, str | None]:
    """The installation's id, or, when it can be neither read nor stored (a read-only data
    dir, a directory in its place), a random one for this process and a note saying so."""
    import uuid

    try:
        return ensure_instance_id(data_dir), None
    except OSError as exc:
        note = (
            f"the instance id cannot be stored in {data_dir} ({exc}); this process uses a "
            "temporary one"
        )
        log.warning("waypost: %s", note)
        return str(uuid.uuid4()), note
