"""How a block's fields show in the Prefect UI's block form.

Pydantic describes an optional field (`X | None = None`) as `anyOf: [X, null]` with
`default: null`, and the Prefect UI turns that into a pair of tabs ("password | null",
"Property is type None"); under those tabs a secret is typed into a plain text area, in
clear. A field made with `optional()` is described as its one type, with no default:
the form shows one input (a masked one for a SecretStr, since pydantic marks it
`format: password, writeOnly`), and a field left empty is simply not sent, so the block
keeps None. Nothing changes for Python: the field is still `X | None = None`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field


def optional(*, title: str, description: str, **constraints: Any) -> Any:
    """A block field that may be left empty (None), shown as one input in the UI's form."""
    return Field(
        default=None,
        title=title,
        description=description,
        json_schema_extra=one_input,
        **constraints,
    )


def one_input(schema: dict[str, Any]) -> None:
    """Describe an `X | None` field as X alone, without its null default (see above)."""
    variants = [v for v in schema.get("anyOf", []) if v.get("type") != "null"]
    if len(variants) == 1:
        del schema["anyOf"]
        schema.update(variants[0])
    if "default" in schema and schema["default"] is None:
        del schema["default"]
