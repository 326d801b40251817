"""The parliament documents API (the Bundestag DIP API's shape) that document-sync reads."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, HttpUrl, SecretStr

from syncpoint.blocks.form import optional
from syncpoint.blocks.market_api import MarketApi
from syncpoint.core.http import AuthMode

# One plenary protocol's full text runs to about 1 MB and a text page holds up to ten.
DIP_MAX_RESPONSE_BYTES = 32 * 1024 * 1024


class DipApi(MarketApi):
    """Connection settings for a DIP-style documents API (/api/v1/{entity}, cursor paging).

    Same pacing, retry and bounding settings as the market API block; the key goes in the
    `Authorization: ApiKey` header by default, so it never appears in a URL.

    Example:
        ```python
        from syncpoint.blocks.dip_api import DipApi

        api = DipApi.load("BLOCK_NAME")
        async with api.client() as client:
            page = await client.get_json("/api/v1/drucksache")
        ```
    """

    _block_type_name = "Syncpoint DIP API"
    _block_type_slug = "syncpoint-dip-api"
    _description = "Base URL, key and pacing for the DIP-style documents API syncpoint reads."
    _documentation_url = HttpUrl("https://github.com/syncpoint/syncpoint#document-sync")
    key_hint: ClassVar[str] = "DIP_API_KEY or the Syncpoint DIP API block's api_key"

    base_url: str = Field(
        default="https://search.dip.bundestag.de",
        title="Base URL",
        description=(
            "Root URL of the API; requests go to this URL followed by /api/v1/ and the entity name."
        ),
    )
    api_key: SecretStr | None = optional(
        title="API key",
        description=(
            "API key (the DIP's are 42 characters): sent in the Authorization header, or as "
            "the apikey query parameter when key_in_header is off; never logged or shown "
            "again. Empty: the worker's DIP_API_KEY, if any."
        ),
    )
    key_in_header: bool = Field(
        default=True,
        title="Key in header",
        description=(
            "Send the key in the Authorization header, as ApiKey followed by the key: it "
            "stays out of URLs, proxies' access logs and every logged URL. Off: the apikey "
            "query parameter."
        ),
    )
    max_response_bytes: int = Field(
        default=DIP_MAX_RESPONSE_BYTES,
        ge=1024,
        description=(
            "Largest answer accepted, in bytes after decompression; a larger one is refused "
            "while it streams. Higher than the market API's: a page of ten full texts "
            "(plenarprotokoll-text) can hold several MB."
        ),
    )

    def _auth(self) -> AuthMode:
        return "header" if self.key_in_header else "query"
