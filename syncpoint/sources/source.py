"""What the batch engine needs from a dataset: one module per source implements it."""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from syncpoint.core.http import ApiClient


class Source(Protocol):
    """One dataset of one API; one module per source implements it."""

    table: ClassVar[str]

    @property
    def concurrency(self) -> int: ...

    def cache_identity(self) -> str: ...

    def client(self) -> ApiClient: ...

    async def fetch(self, client: ApiClient, item: str) -> list[dict[str, Any]]: ...
