"""docs/openapi.json is what the API serves: regenerate it with `make schemas` after a change."""

from __future__ import annotations

from pathlib import Path

from cityops.api.openapi import openapi_document, render

CHECKED_IN = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def test_checked_in_openapi_is_current() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == render(openapi_document()), (
        "docs/openapi.json is stale: run `make schemas`"
    )


def test_document_lists_every_domain() -> None:
    paths = openapi_document()["paths"]
    for prefix in ("/v1/devices", "/v1/tickets", "/v1/districts", "/v1/api-keys", "/v1/stream"):
        assert any(path.startswith(prefix) for path in paths), prefix
