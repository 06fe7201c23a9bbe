"""Every error waypost raises, in one place; each message names the cause and the fix."""

from __future__ import annotations


class WaypostError(Exception):
    """Base class of all waypost errors."""


def _sanitised(text: str) -> str:
    from waypost.privacy.secrets import sanitise  # here: the privacy package imports this one

    return sanitise(text)


class ConfigError(WaypostError):
    """The configuration is wrong: the message names the file, the key path and the reason.

    The reason passes :func:`waypost.privacy.sanitise`: a configured secret, or anything the
    scrubbers find, is masked even where a message would quote a value."""

    def __init__(self, reason: str, *, source: str | None = None, key: str | None = None) -> None:
        reason = _sanitised(reason)
        self.reason = reason
        self.source = source
        self.key = key
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {reason}" if where else reason)


class MissingVariableError(ConfigError):
    """A ``${VAR}`` in the config names an environment variable that is not set."""


class UnknownSinkError(ConfigError):
    """Config names a sink type that no installed plugin provides."""


class PluginError(WaypostError):
    """A plugin failed: to import, to register its sinks, or in a hook called at start (the
    message is sanitised, as a :class:`ConfigError`'s); ``plugin`` names it when known."""

    def __init__(self, message: str = "", *, plugin: str | None = None) -> None:
        super().__init__(_sanitised(message))
        self.plugin = plugin


class TrackError(WaypostError):
    """An event was refused (raised only in strict mode; production counts and logs it)."""


class SinkContractError(WaypostError):
    """A sink broke the plugin contract (for example, returned garbage from ``send``)."""


class SinkError(WaypostError):
    """Raised by a sink's ``send`` to report that a whole batch failed.

    ``retryable`` decides whether the core tries again; ``retry_after`` (seconds) is the
    destination's own wish, which the retry policy honours.
    """

    retryable: bool = True

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class RetryableError(SinkError):
    """A temporary failure: timeout, connection error, 408, 429, 5xx."""

    retryable = True


class PermanentError(SinkError):
    """A failure that retrying cannot fix: a refused key, a malformed event."""

    retryable = False


class PayloadTooLarge(SinkError):
    """The destination refused the batch as too large (413): the core splits it and retries."""

    retryable = True
