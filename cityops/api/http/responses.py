"""JSON responses serialised straight from dicts with orjson.

The hot read routes build documents that already have the shape of their declared
`response_model` (the OpenAPI contract, checked by the schemathesis test); returning them as a
Response skips FastAPI's re-validation of every item, which was most of the CPU of a 100-item
list page.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


def json_response(document: Any, *, status_code: int = 200) -> Response:
    """`document` as application/json (datetimes as RFC 3339, as pydantic would)."""
    return Response(orjson.dumps(document), status_code=status_code, media_type="application/json")
