"""Check a kind's Smart Data Model mapping against the models' JSON Schemas.

The schemas are not part of cityops: a city (or a test) points `--models` /
`CITYOPS_SMART_DATA_MODELS_DIR` at a folder holding `<Model>/schema.json` and, for the
shared definitions the models refer to, `common-schema.json` (as the smart-data-models
GitHub organisation publishes them). Without that folder the mapping is checked for form only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cityops.kinds.spec import KindFileError, KindSpec

_COMMON_SCHEMA = "common-schema.json"
_DEFINITIONS = "#/definitions/"


def _walk(node: object) -> Iterator[Mapping[str, Any]]:
    """Every JSON object in a schema document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class SmartDataModels:
    """The attributes of each model in a folder of Smart Data Model schemas, read on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._attributes: dict[str, frozenset[str] | None] = {}
        self._common: dict[str, Any] | None = None

    def _common_definitions(self) -> Mapping[str, Any]:
        if self._common is None:
            path = self.folder / _COMMON_SCHEMA
            self._common = _read_json(path).get("definitions", {}) if path.is_file() else {}
        return self._common

    def _referenced(self, ref: str) -> set[str]:
        """Attribute names a `$ref` into the common schema brings in."""
        if _DEFINITIONS not in ref or not ref.split("#", maxsplit=1)[0].endswith(_COMMON_SCHEMA):
            return set()
        path = ref.split(_DEFINITIONS, 1)[1].split("/")
        if len(path) >= 3 and path[1] == "properties":  # .../Location-Commons/properties/address
            return {path[2]}
        definition = self._common_definitions().get(path[0], {})
        names: set[str] = set()
        for node in _walk(definition):
            names.update(node.get("properties", {}))
        return names

    def attributes(self, model: str) -> frozenset[str] | None:
        """The attribute names of `model`, or None when the folder has no schema for it."""
        if model not in self._attributes:
            path = self.folder / model / "schema.json"
            if not path.is_file():
                self._attributes[model] = None
            else:
                names: set[str] = set()
                for node in _walk(_read_json(path)):
                    names.update(node.get("properties", {}))
                    ref = node.get("$ref")
                    if isinstance(ref, str):
                        names |= self._referenced(ref)
                self._attributes[model] = frozenset(names)
        return self._attributes[model]

    def check(self, kind: KindSpec) -> None:
        """Raise KindFileError for a field whose model or attribute the schemas do not have."""
        for spec in kind.fields:
            ref = spec.smart_data_model
            known = self.attributes(ref.model)
            if known is None:
                raise KindFileError(
                    kind.source,
                    f"smart_data_model.model: no schema for Smart Data Model {ref.model!r} "
                    f"in {self.folder}",
                    kind=kind.name,
                    field_name=spec.name,
                )
            if ref.attribute not in known:
                raise KindFileError(
                    kind.source,
                    f"smart_data_model.attribute: {ref.attribute!r} is not an attribute of "
                    f"Smart Data Model {ref.model!r}",
                    kind=kind.name,
                    field_name=spec.name,
                )
