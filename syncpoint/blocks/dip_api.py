"""The parliament documents API (the Bundestag DIP API's shape) that document-sync reads."""

from __future__ import annotations

from pydantic import Field, HttpUrl

from syncpoint.blocks.market_api import MarketApi


class DipApi(MarketApi):
    """Connection settings for a DIP-style documents API (/api/v1/{entity}, cursor paging).

    Same pacing and retry settings as the market API block; only the service differs.

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

    base_url: str = Field(
        default="https://search.dip.bundestag.de",
        description=(
            "Root URL of the API; requests go to this URL followed by /api/v1/ and the entity name."
        ),
    )
