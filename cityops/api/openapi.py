"""The API's OpenAPI document, built without servers; `make schemas` writes docs/openapi.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from prometheus_client import CollectorRegistry

from cityops.api.app import create_app
from cityops.api.context import ApiContext


def openapi_document() -> dict[str, Any]:
    """The document `/openapi.json` serves (routes and models only; no collaborator is used)."""
    # create_app reads only the import body limit at build time; nothing else of the context.
    spec_only = SimpleNamespace(settings=SimpleNamespace(api_import_max_bytes=1), metrics=None)
    app = create_app(cast(ApiContext, spec_only), registry=CollectorRegistry())
    return app.openapi()


def render(document: dict[str, Any]) -> str:
    """Stable text for the checked-in copy: sorted keys, two-space indent, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Write the OpenAPI document to a file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="file to write, e.g. docs/openapi.json")
    args = parser.parse_args(argv)
    args.out.write_text(render(openapi_document()), encoding="utf-8")


if __name__ == "__main__":
    main()
