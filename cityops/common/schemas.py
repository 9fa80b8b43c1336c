"""Export the JSON Schemas of the event contract to docs/schemas/ (`make schemas`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from cityops.common.events import (
    ManholeReading,
    ParkingReading,
    Reading,
    StatusEvent,
    StatusPayload,
    StreetlightReading,
    WastebinReading,
)


def contract_schemas() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema for every payload of the contract."""
    return {
        "reading.schema.json": TypeAdapter(Reading).json_schema(),
        "streetlight.schema.json": StreetlightReading.model_json_schema(),
        "manhole.schema.json": ManholeReading.model_json_schema(),
        "wastebin.schema.json": WastebinReading.model_json_schema(),
        "parking.schema.json": ParkingReading.model_json_schema(),
        "status.schema.json": StatusPayload.model_json_schema(),
        "status-event.schema.json": StatusEvent.model_json_schema(),
    }


def render(schema: dict[str, Any]) -> str:
    """Stable text of a schema file."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_schemas(folder: Path) -> list[Path]:
    """Write every schema into `folder`; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in contract_schemas().items():
        path = folder / name
        path.write_text(render(schema), encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_schemas(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        print(written_path)
