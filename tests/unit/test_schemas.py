"""docs/schemas/ must match the models: regenerate with `make schemas` when this fails."""

from __future__ import annotations

from pathlib import Path

from cityops.common.schemas import contract_schemas, render

SCHEMAS = Path(__file__).resolve().parents[2] / "docs" / "schemas"


def test_exported_json_schemas_are_current() -> None:
    stale = [
        name
        for name, schema in contract_schemas().items()
        if not (SCHEMAS / name).exists() or (SCHEMAS / name).read_text("utf-8") != render(schema)
    ]
    assert not stale, f"stale JSON Schemas {stale}: run `make schemas`"


def test_no_orphan_schema_files() -> None:
    assert {p.name for p in SCHEMAS.glob("*.json")} == set(contract_schemas())
