"""Compile a kind into its reading model: strict pydantic, built once at start.

The model is what a hand-written class of the same fields would be (`ReadingBase` plus a
`kind` literal and one annotated attribute per field), so pydantic-core validates it at the
same speed and exports the same JSON Schema, with each field's description and unit added.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, create_model

from cityops.common.events import ReadingBase
from cityops.kinds.spec import FieldSpec, KindSpec

# Strings in readings end up in PostgreSQL jsonb, which refuses NUL; control characters have
# no business in a sensor's words either.
_PRINTABLE = r"^[^\x00-\x1f\x7f]*$"


def model_name(kind: str) -> str:
    """`air_quality` -> `AirQualityReading` (the JSON Schema title)."""
    return "".join(part.capitalize() for part in kind.split("_")) + "Reading"


def field_annotation(spec: FieldSpec) -> Any:
    """The pydantic type of one field, its constraints included."""
    if spec.type == "bool":
        return bool
    if spec.type == "enum":
        return Literal[spec.values]
    if spec.type == "string":
        return Annotated[str, Field(max_length=spec.max_length, pattern=_PRINTABLE)]
    low, high = spec.bounds()
    base = int if spec.type == "integer" else float
    return Annotated[base, Field(ge=low, le=high)]


def field_description(spec: FieldSpec) -> str:
    """The field's description for the JSON Schema, its unit appended."""
    return f"{spec.description} Unit: {spec.unit}." if spec.unit else spec.description


def compile_reading_model(kind: KindSpec) -> type[ReadingBase]:
    """The strict model of a reading of `kind` (extra fields forbidden, like every reading)."""
    definitions: dict[str, Any] = {"kind": (Literal[kind.name], ...)}
    for spec in kind.fields:
        annotation = field_annotation(spec)
        description = field_description(spec)
        if spec.required:
            definitions[spec.name] = (annotation, Field(description=description))
        else:
            definitions[spec.name] = (annotation | None, Field(None, description=description))
    model: type[ReadingBase] = create_model(
        model_name(kind.name),
        __base__=ReadingBase,
        __doc__=kind.description,
        __module__=__name__,
        **definitions,
    )
    return model
