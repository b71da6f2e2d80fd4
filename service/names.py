"""Client-chosen names at the HTTP edge: one rule (``butd.store.ids``) for every route.

The query parameters below document the bounds in the OpenAPI document; the value itself is
checked by ``butd.store.ids`` (``InvalidNameError``, mapped once to a 422 ``invalid_name`` that
states the rule), the same whether it came in the query string, a form field or a job body.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

from butd.store import ids

DEFAULT_NAMESPACE = "default"
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"

IMAGE_ID_PATTERN = ids.IMAGE_ID_PATTERN
ImageIdQuery = Annotated[
    str | None,
    Query(
        description=ids.IMAGE_ID_RULE,
        json_schema_extra={"pattern": IMAGE_ID_PATTERN.replace("{1,", "{0,")},
    ),
]
NamespaceQuery = Annotated[
    str | None,
    Query(
        description=f"{ids.NAMESPACE_RULE} (default: {DEFAULT_NAMESPACE})",
        json_schema_extra={"pattern": ids.NAMESPACE_PATTERN.replace("{1,", "{0,")},
    ),
]
ImageIdPath = Annotated[
    str, Path(description=ids.IMAGE_ID_RULE, json_schema_extra={"pattern": IMAGE_ID_PATTERN})
]
Sha256Path = Annotated[str, Path(pattern=SHA256_PATTERN, description="hex sha256 of the bytes")]
Sha256Query = Annotated[
    str | None, Query(pattern=SHA256_PATTERN, description="hex sha256 of the image bytes")
]


def namespace_of(value: str | None) -> str:
    """The namespace named (default when absent or empty), checked by the one rule."""
    return ids.check_namespace(value or DEFAULT_NAMESPACE)


def given_id(form: str | None, query: str | None) -> str | None:
    """The image id of an upload (form field first, then query; empty = none), checked."""
    value = form or query
    return ids.check_image_id(value) if value else None
