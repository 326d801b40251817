"""Every error syncpoint raises on purpose, classified once.

The CLI maps these to exit codes and one-line messages; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class SyncError(Exception):
    """Base for errors that are explained to the user, not dumped as a traceback."""


class ConfigError(SyncError):
    """Bad configuration or input: exit 2 and say what to change."""


class StorageError(SyncError):
    """The database failed under us (went away, refused a write): rerun once it is back."""


class CheckpointError(SyncError):
    """A checkpoint that cannot be trusted: corrupt, unknown version, or held by another run."""


class ApiError(SyncError):
    """An HTTP API answered with something other than usable data.

    `url` is already redacted: it never carries the key.
    """

    def __init__(self, message: str, *, status_code: int | None = None, url: str = "") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.url = url


class FatalApiError(ApiError):
    """The API refused us as a client (401/403): every further request would fail too."""


class RetriableApiError(ApiError):
    """Worth trying again later: 5xx, 429, timeouts, dropped connections."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        url: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, url=url)
        self.retry_after = retry_after


class ItemError(ApiError):
    """This one item cannot be fetched or parsed (400/404, garbage, wrong shape): give up on it."""
