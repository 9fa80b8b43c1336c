"""One kind file: the YAML text checked into a typed, immutable `KindSpec`.

Every problem is a `KindFileError` whose text is one line naming the file, the kind and the
field (docs/kinds.md lists every key). The checks are strict on purpose: a kind file is the
contract of every reading of its kind, read by ingest, rules, the API and the simulator.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel

from cityops.common.events import MAX_QUANTITY

KIND_FILE_VERSION = 1
KIND_FILE_SUFFIX = ".yaml"
MAX_KIND_FILE_BYTES = 256 * 1024
MAX_FIELDS = 64
MAX_ENUM_VALUES = 64
MAX_STRING_LENGTH = 1024
MAX_TEXT = 500
# A bound written in a kind file; open-ended quantities default to +-MAX_QUANTITY
# (cityops.common.events), so that sums over years of readings stay finite in PostgreSQL.
MAX_BOUND = 1e12
MAX_REPORTING_INTERVAL_S = 7 * 86400

KIND_NAME_PATTERN = r"^[a-z][a-z0-9_]{1,31}$"
FIELD_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
ID_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
ENUM_VALUE_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
SDM_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,127}$"
ID_PREFIX_PATTERN = r"^[a-z][a-z0-9]{0,7}$"
_KIND_NAME = re.compile(KIND_NAME_PATTERN)
_FIELD_NAME = re.compile(FIELD_NAME_PATTERN)
_ID = re.compile(ID_PATTERN)
_ENUM_VALUE = re.compile(ENUM_VALUE_PATTERN)
_SDM_NAME = re.compile(SDM_NAME_PATTERN)
_ID_PREFIX = re.compile(ID_PREFIX_PATTERN)

# Fields every reading has (A3) and the two ingest adds on Kafka: a kind cannot redefine them.
COMMON_FIELDS = ("device_id", "kind", "ts", "seq", "battery_pct", "rssi_dbm")
ENVELOPE_FIELDS = ("received_at", "ingest_id")
# pydantic's own attribute names, which a field of a compiled model would shadow.
_MODEL_ATTRIBUTES = frozenset(name for name in dir(BaseModel) if not name.startswith("__"))

FieldType = Literal["bool", "number", "integer", "enum", "string"]
FIELD_TYPES: tuple[FieldType, ...] = ("bool", "number", "integer", "enum", "string")
KpiMeasure = Literal["share", "mean", "count"]
KPI_MEASURES: tuple[KpiMeasure, ...] = ("share", "mean", "count")
PANEL_TYPES = ("timeseries", "stat", "gauge", "state_timeline", "bar_gauge")
BUILTIN_BEHAVIOURS = ("generic", "streetlight", "manhole", "wastebin", "parking")
CONDITION_OPS = ("==", "!=", ">=", ">", "<=", "<")

Number = int | float


class KindFileError(ValueError):
    """A kind file that cannot be used: one line naming the file, the kind and the field."""

    def __init__(
        self, source: str, message: str, *, kind: str | None = None, field_name: str | None = None
    ) -> None:
        self.source = source
        self.kind = kind
        self.field_name = field_name
        self.problem = " ".join(message.split())  # YAML errors span lines; a report must not
        where = source
        if kind is not None:
            where += f": kind {kind!r}"
        if field_name is not None:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {self.problem}")


class _ProblemError(ValueError):
    """One bad part of a kind file; wrapped into KindFileError with its location."""

    def __init__(self, message: str, *, field_name: str | None = None) -> None:
        super().__init__(message)
        self.field_name = field_name


@dataclass(frozen=True, slots=True)
class SmartDataModelRef:
    """Where a field lives in a FIWARE Smart Data Model entity."""

    model: str
    attribute: str
    # value in the model = value here x scale (e.g. a percentage as a 0-1 fraction)
    scale: float | None = None
    # value here -> value in the model, for enums and booleans ("true" / "false" keys)
    values: Mapping[str, str] = field(default_factory=dict)
    # for a generic measurement model (DeviceMeasurement): what the attribute measures
    controlled_property: str | None = None


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One kind-specific field of a reading."""

    name: str
    type: FieldType
    description: str
    smart_data_model: SmartDataModelRef
    unit: str | None = None
    required: bool = False
    minimum: Number | None = None  # as written: an int stays an int (the JSON Schema shows it)
    maximum: Number | None = None
    values: tuple[str, ...] = ()  # enum
    max_length: int | None = None  # string

    @property
    def is_measure(self) -> bool:
        """A number or boolean: what can be compared, averaged and charted."""
        return self.type in ("bool", "number", "integer")

    def bounds(self) -> tuple[Number, Number]:
        """The range a number or integer must lie in, the open-ended defaults applied."""
        if self.type == "integer":
            cap: Number = int(MAX_QUANTITY)
        else:
            cap = MAX_QUANTITY
        low = self.minimum if self.minimum is not None else -cap
        high = self.maximum if self.maximum is not None else cap
        return low, high


@dataclass(frozen=True, slots=True)
class Clause:
    """`<field> <op> <value>` over a kind's fields (KPIs)."""

    field: str
    op: str
    value: float | bool | str

    def __str__(self) -> str:
        shown = str(self.value).lower() if isinstance(self.value, bool) else self.value
        return f"{self.field} {self.op} {shown}"


@dataclass(frozen=True, slots=True)
class KpiSpec:
    """A district KPI the kind contributes, computed over each device's latest reading."""

    id: str
    title: str
    measure: KpiMeasure
    unit: str | None = None
    where: tuple[Clause, ...] = ()  # share / count: all must hold
    field: str | None = None  # mean
    or_open_ticket: tuple[str, ...] = ()  # share / count: or an open ticket of these rules


@dataclass(frozen=True, slots=True)
class FieldSimulation:
    """How the generic behaviour draws one field (docs/kinds.md, "simulator")."""

    mean: float | None = None
    spread: float | None = None
    daily_amplitude: float = 0.0
    daily_peaks_h: tuple[float, ...] = ()
    rain_gain: float = 0.0
    true_share: float | None = None
    weights: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SimulatorSpec:
    """How the simulator makes devices of this kind."""

    id_prefix: str
    behaviour: str = "generic"
    mains_powered: bool = False
    battery_drain_pct_per_day: float = 0.05
    fields: Mapping[str, FieldSimulation] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PanelSpec:
    """A dashboard panel hint: what a generated dashboard shows for the kind."""

    title: str
    type: str
    fields: tuple[str, ...] = ()
    kpi: str | None = None


@dataclass(frozen=True, slots=True)
class KindSpec:
    """A kind, as its file says."""

    name: str
    title: str
    description: str
    reporting_interval_s: int
    smart_data_model: str
    fields: tuple[FieldSpec, ...]
    simulator: SimulatorSpec
    retention_days: int = 90
    kpis: tuple[KpiSpec, ...] = ()
    panels: tuple[PanelSpec, ...] = ()
    source: str = ""

    def field(self, name: str) -> FieldSpec | None:
        """The field called `name`, or None."""
        return next((f for f in self.fields if f.name == name), None)

    @property
    def field_names(self) -> tuple[str, ...]:
        """The kind-specific field names, in file order."""
        return tuple(f.name for f in self.fields)


# --- YAML --------------------------------------------------------------------------------


def _compose(text: str) -> yaml.Node | None:
    loader = yaml.SafeLoader(text)
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _duplicates(node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
    """Raise on a key given twice in one mapping (PyYAML would keep the last silently)."""
    if id(node) in seen:  # aliases share nodes: visit each once
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        keys: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in keys:
                raise _ProblemError(
                    f"key {key!r} given twice (lines {keys[key]} and {line})"
                    if path != ("fields",)
                    else f"field defined twice (lines {keys[key]} and {line})",
                    field_name=_field_of((*path, key)),
                )
            keys[key] = line
            _duplicates(value_node, (*path, key), seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _duplicates(item, (*path, str(index)), seen)


def _field_of(path: tuple[str, ...]) -> str | None:
    if len(path) >= 2 and path[0] == "fields":
        return path[1]
    return None


def read_document(text: str) -> object:
    """YAML text -> Python data, refusing duplicate keys; raises _ProblemError."""
    try:
        node = _compose(text)
    except yaml.YAMLError as exc:
        raise _ProblemError(f"not valid YAML: {exc}") from exc
    if node is None:
        raise _ProblemError("the file is empty")
    _duplicates(node, (), set())
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise _ProblemError(f"not valid YAML: {exc}") from exc
    finally:
        loader.dispose()


# --- checks ------------------------------------------------------------------------------

_KIND_KEYS = {
    "version": True,
    "name": True,
    "title": True,
    "description": True,
    "reporting_interval_s": True,
    "smart_data_model": True,
    "fields": True,
    "simulator": True,
    "retention_days": False,
    "kpis": False,
    "dashboard": False,
}
_FIELD_KEYS = {
    "type": True,
    "description": True,
    "smart_data_model": True,
    "unit": False,
    "required": False,
    "min": False,
    "max": False,
    "values": False,
    "max_length": False,
}


def _keys(mapping: object, allowed: Mapping[str, bool], what: str) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise _ProblemError(f"{what}: expected a mapping, got {_shown(mapping)}")
    unknown = sorted(str(k) for k in mapping if k not in allowed)
    if unknown:
        raise _ProblemError(f"{what}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    missing = [k for k, needed in allowed.items() if needed and k not in mapping]
    if missing:
        raise _ProblemError(f"{what}: missing required keys {missing}")
    return cast("dict[str, Any]", mapping)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def _text(value: object, what: str, *, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _ProblemError(f"{what}: a non-empty text, got {_shown(value)}")
    if len(value) > limit or not value.isprintable():
        raise _ProblemError(f"{what}: one printable line of at most {limit} characters")
    return value


def _number(value: object, what: str) -> Number:
    if isinstance(value, bool) or not isinstance(value, int | float):
        hint = " (YAML reads 1e6 as text: write 1.0e+6)" if isinstance(value, str) else ""
        raise _ProblemError(f"{what}: a number, got {_shown(value)}{hint}")
    if not math.isfinite(value) or abs(value) > MAX_BOUND:
        raise _ProblemError(f"{what}: a finite number within +-{MAX_BOUND:g}, got {value!r}")
    return value


def _bool(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise _ProblemError(f"{what}: true or false, got {_shown(value)}")
    return value


def _name(value: object, pattern: re.Pattern[str], what: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise _ProblemError(f"{what}: must match {pattern.pattern}, got {_shown(value)}")
    return value


def _list(value: object, what: str, *, limit: int) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise _ProblemError(f"{what}: a non-empty list, got {_shown(value)}")
    if len(value) > limit:
        raise _ProblemError(f"{what}: at most {limit} entries, got {len(value)}")
    return value


def _sdm_ref(value: object, kind_model: str, spec: _FieldDraft) -> SmartDataModelRef:
    entry = _keys(
        value,
        {
            "attribute": True,
            "model": False,
            "scale": False,
            "values": False,
            "controlled_property": False,
        },
        "smart_data_model",
    )
    model = _name(entry.get("model", kind_model), _SDM_NAME, "smart_data_model.model")
    attribute = _name(entry["attribute"], _SDM_NAME, "smart_data_model.attribute")
    scale = None
    if "scale" in entry:
        if spec.type not in ("number", "integer"):
            raise _ProblemError(
                f"smart_data_model.scale: only for numbers, this field is {spec.type}"
            )
        scale = float(_number(entry["scale"], "smart_data_model.scale"))
        if scale == 0:
            raise _ProblemError("smart_data_model.scale: must not be 0")
    mapped: dict[str, str] = {}
    if "values" in entry:
        raw = entry["values"]
        if spec.type not in ("enum", "bool") or not isinstance(raw, dict) or not raw:
            raise _ProblemError(
                "smart_data_model.values: a mapping of this field's values to the model's, "
                "for enum and bool fields only"
            )
        own = spec.values if spec.type == "enum" else ("true", "false")
        for key, model_value in raw.items():
            ours = str(key).lower() if isinstance(key, bool) else key
            if ours not in own:
                raise _ProblemError(
                    f"smart_data_model.values: {_shown(key)} is not a value of this field "
                    f"({list(own)})"
                )
            if not isinstance(model_value, str) or not model_value:
                raise _ProblemError(
                    f"smart_data_model.values: {key!r} -> a text, got {model_value!r}"
                )
            mapped[ours] = model_value
    controlled = None
    if "controlled_property" in entry:
        controlled = _name(
            entry["controlled_property"], _SDM_NAME, "smart_data_model.controlled_property"
        )
    return SmartDataModelRef(
        model=model,
        attribute=attribute,
        scale=scale,
        values=mapped,
        controlled_property=controlled,
    )


@dataclass(slots=True)
class _FieldDraft:
    type: FieldType
    values: tuple[str, ...] = ()


def _parse_field(name: str, value: object, kind_model: str) -> FieldSpec:
    entry = _keys(value, _FIELD_KEYS, "the field")
    ftype = entry["type"]
    if ftype not in FIELD_TYPES:
        raise _ProblemError(f"type: unknown type {_shown(ftype)}; known: {list(FIELD_TYPES)}")
    description = _text(entry["description"], "description")
    unit = _text(entry["unit"], "unit", limit=32) if "unit" in entry else None
    required = _bool(entry.get("required", False), "required")
    minimum = maximum = max_length = None
    values: tuple[str, ...] = ()
    for key in ("min", "max"):
        if key in entry and ftype not in ("number", "integer"):
            raise _ProblemError(f"{key}: only for number and integer fields, this one is {ftype}")
    if ftype in ("number", "integer"):
        if "min" in entry:
            minimum = _number(entry["min"], "min")
        if "max" in entry:
            maximum = _number(entry["max"], "max")
        if ftype == "integer":
            for key, bound in (("min", minimum), ("max", maximum)):
                if bound is not None and not isinstance(bound, int):
                    raise _ProblemError(
                        f"{key}: an integer field needs a whole bound, got {bound!r}"
                    )
        if minimum is not None and maximum is not None and minimum > maximum:
            raise _ProblemError(f"min {minimum} > max {maximum}")
    if "values" in entry and ftype != "enum":
        raise _ProblemError(f"values: only for enum fields, this one is {ftype}")
    if ftype == "enum":
        if "values" not in entry:
            raise _ProblemError("values: an enum field needs its list of values")
        raw = _list(entry["values"], "values", limit=MAX_ENUM_VALUES)
        for item in raw:
            if not isinstance(item, str) or not _ENUM_VALUE.fullmatch(item):
                hint = (
                    " (quote yes/no/on/off: YAML reads them as booleans)"
                    if isinstance(item, bool)
                    else ""
                )
                raise _ProblemError(
                    f"values: each must match {ENUM_VALUE_PATTERN}, got {_shown(item)}{hint}"
                )
        if len(set(raw)) != len(raw):
            raise _ProblemError(
                f"values: listed twice: {sorted({v for v in raw if raw.count(v) > 1})}"
            )
        values = tuple(raw)
    if "max_length" in entry and ftype != "string":
        raise _ProblemError(f"max_length: only for string fields, this one is {ftype}")
    if ftype == "string":
        if "max_length" not in entry:
            raise _ProblemError("max_length: a string field needs its maximum length")
        length = entry["max_length"]
        if isinstance(length, bool) or not isinstance(length, int):
            raise _ProblemError(f"max_length: a whole number, got {_shown(length)}")
        if not 1 <= length <= MAX_STRING_LENGTH:
            raise _ProblemError(f"max_length: 1 to {MAX_STRING_LENGTH}, got {length}")
        max_length = length
    try:
        ref = _sdm_ref(entry["smart_data_model"], kind_model, _FieldDraft(ftype, values))
    except _ProblemError as exc:
        raise _ProblemError(str(exc)) from None
    return FieldSpec(
        name=name,
        type=ftype,
        description=description,
        smart_data_model=ref,
        unit=unit,
        required=required,
        minimum=minimum,
        maximum=maximum,
        values=values,
        max_length=max_length,
    )


def _parse_fields(value: object, kind_model: str) -> tuple[FieldSpec, ...]:
    if not isinstance(value, dict) or not value:
        raise _ProblemError(f"key 'fields': a mapping of field name to field, got {_shown(value)}")
    if len(value) > MAX_FIELDS:
        raise _ProblemError(f"key 'fields': at most {MAX_FIELDS} fields, got {len(value)}")
    fields = []
    for name, entry in value.items():
        label = name if isinstance(name, str) else repr(name)
        if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
            raise _ProblemError(
                f"bad field name: must match {FIELD_NAME_PATTERN}", field_name=label
            )
        if name in COMMON_FIELDS or name in ENVELOPE_FIELDS:
            raise _ProblemError(
                "every reading has this field already (A3); a kind cannot redefine it",
                field_name=name,
            )
        if name in _MODEL_ATTRIBUTES or name.startswith("model_"):
            raise _ProblemError("reserved name (a pydantic model attribute)", field_name=name)
        try:
            fields.append(_parse_field(name, entry, kind_model))
        except _ProblemError as exc:
            raise _ProblemError(str(exc), field_name=name) from None
    return tuple(fields)


def parse_clause(text: object, fields: Mapping[str, FieldSpec], what: str) -> Clause:
    """`<field> <op> <value>` typed against the kind's fields; raises _ProblemError."""
    parts = text.split() if isinstance(text, str) else []
    if len(parts) != 3:
        raise _ProblemError(f"{what}: {_shown(text)} is not '<field> <op> <value>'")
    name, op, word = parts
    spec = fields.get(name)
    if spec is None:
        raise _ProblemError(f"{what}: {text!r}: unknown field {name!r}; fields: {sorted(fields)}")
    if op not in CONDITION_OPS:
        raise _ProblemError(f"{what}: {text!r}: operator must be one of {list(CONDITION_OPS)}")
    value: float | bool | str
    if spec.type in ("number", "integer"):
        try:
            value = float(word)
        except ValueError:
            raise _ProblemError(f"{what}: {text!r}: {name} is a number") from None
    elif spec.type == "bool":
        if word not in ("true", "false") or op not in ("==", "!="):
            raise _ProblemError(f"{what}: {text!r}: {name} is true/false; use == or !=")
        value = word == "true"
    else:
        if op not in ("==", "!="):
            raise _ProblemError(f"{what}: {text!r}: {name} is a word; use == or !=")
        if spec.type == "enum" and word not in spec.values:
            raise _ProblemError(f"{what}: {text!r}: {word!r} is not one of {list(spec.values)}")
        value = word
    return Clause(field=name, op=op, value=value)


def _parse_kpis(value: object, fields: Mapping[str, FieldSpec]) -> tuple[KpiSpec, ...]:
    kpis = []
    seen: set[str] = set()
    for index, raw in enumerate(_list(value, "key 'kpis'", limit=32)):
        what = f"kpis[{index}]"
        entry = _keys(
            raw,
            {
                "id": True,
                "title": True,
                "measure": True,
                "unit": False,
                "where": False,
                "field": False,
                "or_open_ticket": False,
            },
            what,
        )
        kpi_id = _name(entry["id"], _ID, f"{what}.id")
        what = f"kpis[{index}] ({kpi_id})"
        if kpi_id in seen:
            raise _ProblemError(f"{what}: id given twice")
        seen.add(kpi_id)
        measure = entry["measure"]
        if measure not in KPI_MEASURES:
            raise _ProblemError(
                f"{what}.measure: one of {list(KPI_MEASURES)}, got {_shown(measure)}"
            )
        where: tuple[Clause, ...] = ()
        kpi_field = None
        tickets: tuple[str, ...] = ()
        if measure == "mean":
            if "where" in entry or "or_open_ticket" in entry or "field" not in entry:
                raise _ProblemError(f"{what}: a mean takes 'field' (no 'where', 'or_open_ticket')")
            kpi_field = entry["field"]
            spec = fields.get(kpi_field) if isinstance(kpi_field, str) else None
            if spec is None or spec.type not in ("number", "integer"):
                raise _ProblemError(
                    f"{what}.field: {_shown(kpi_field)} is not a number of this kind"
                )
        else:
            if "field" in entry or "where" not in entry:
                raise _ProblemError(f"{what}: a {measure} takes 'where' (no 'field')")
            clauses = entry["where"]
            clauses = [clauses] if isinstance(clauses, str) else clauses
            where = tuple(
                parse_clause(c, fields, f"{what}.where")
                for c in _list(clauses, f"{what}.where", limit=8)
            )
            if "or_open_ticket" in entry:
                rules = _list(entry["or_open_ticket"], f"{what}.or_open_ticket", limit=16)
                tickets = tuple(_name(r, _ID, f"{what}.or_open_ticket") for r in rules)
        kpis.append(
            KpiSpec(
                id=kpi_id,
                title=_text(entry["title"], f"{what}.title"),
                measure=measure,
                unit=_text(entry["unit"], f"{what}.unit", limit=32) if "unit" in entry else None,
                where=where,
                field=kpi_field,
                or_open_ticket=tickets,
            )
        )
    return tuple(kpis)


def _parse_dashboard(
    value: object, fields: Mapping[str, FieldSpec], kpis: Sequence[KpiSpec]
) -> tuple[PanelSpec, ...]:
    entry = _keys(value, {"panels": True}, "key 'dashboard'")
    panels = []
    kpi_ids = {k.id for k in kpis}
    for index, raw in enumerate(_list(entry["panels"], "dashboard.panels", limit=32)):
        what = f"dashboard.panels[{index}]"
        panel = _keys(raw, {"title": True, "type": True, "fields": False, "kpi": False}, what)
        if panel["type"] not in PANEL_TYPES:
            raise _ProblemError(
                f"{what}.type: one of {list(PANEL_TYPES)}, got {_shown(panel['type'])}"
            )
        if ("fields" in panel) == ("kpi" in panel):
            raise _ProblemError(f"{what}: give 'fields' or 'kpi'")
        names: tuple[str, ...] = ()
        if "fields" in panel:
            names = tuple(_list(panel["fields"], f"{what}.fields", limit=8))
            for name in names:
                spec = fields.get(name) if isinstance(name, str) else None
                if spec is None or not spec.is_measure:
                    raise _ProblemError(f"{what}.fields: {_shown(name)} is not a measured field")
        kpi = panel.get("kpi")
        if kpi is not None and kpi not in kpi_ids:
            raise _ProblemError(f"{what}.kpi: {_shown(kpi)} is not a KPI of this kind")
        panels.append(
            PanelSpec(
                title=_text(panel["title"], f"{what}.title"),
                type=panel["type"],
                fields=names,
                kpi=kpi,
            )
        )
    return tuple(panels)


def _parse_field_simulation(name: str, raw: object, spec: FieldSpec | None) -> FieldSimulation:
    what = f"simulator.fields.{name}"
    if spec is None:
        raise _ProblemError(f"{what}: not a field of this kind")
    if spec.type in ("number", "integer"):
        entry = _keys(
            raw,
            {"mean": True, "spread": False, "daily": False, "rain_gain": False},
            what,
        )
        low, high = spec.bounds()
        mean = float(_number(entry["mean"], f"{what}.mean"))
        if not low <= mean <= high:
            raise _ProblemError(f"{what}.mean: {mean} is outside the field's range {low}..{high}")
        spread = float(_number(entry.get("spread", 0), f"{what}.spread"))
        if spread < 0:
            raise _ProblemError(f"{what}.spread: >= 0, got {spread}")
        amplitude = 0.0
        peaks: tuple[float, ...] = ()
        if "daily" in entry:
            daily = _keys(entry["daily"], {"amplitude": True, "peaks_h": True}, f"{what}.daily")
            amplitude = float(_number(daily["amplitude"], f"{what}.daily.amplitude"))
            hours = _list(daily["peaks_h"], f"{what}.daily.peaks_h", limit=6)
            peaks = tuple(float(_number(h, f"{what}.daily.peaks_h")) for h in hours)
            if not all(0 <= h < 24 for h in peaks):
                raise _ProblemError(f"{what}.daily.peaks_h: hours 0 to 24, got {list(peaks)}")
        rain = float(_number(entry.get("rain_gain", 0), f"{what}.rain_gain"))
        return FieldSimulation(
            mean=mean, spread=spread, daily_amplitude=amplitude, daily_peaks_h=peaks, rain_gain=rain
        )
    if spec.type == "bool":
        entry = _keys(raw, {"true_share": True}, what)
        share = float(_number(entry["true_share"], f"{what}.true_share"))
        if not 0 <= share <= 1:
            raise _ProblemError(f"{what}.true_share: 0 to 1, got {share}")
        return FieldSimulation(true_share=share)
    entry = _keys(raw, {"weights": True}, what)
    weights = entry["weights"]
    if not isinstance(weights, dict) or not weights:
        raise _ProblemError(f"{what}.weights: a mapping of value to weight")
    parsed: dict[str, float] = {}
    for key, weight in weights.items():
        if spec.type == "enum" and key not in spec.values:
            raise _ProblemError(f"{what}.weights: {_shown(key)} is not one of {list(spec.values)}")
        if not isinstance(key, str) or (spec.max_length and len(key) > spec.max_length):
            raise _ProblemError(f"{what}.weights: {_shown(key)} is not a value of this field")
        parsed[key] = float(_number(weight, f"{what}.weights.{key}"))
        if parsed[key] < 0:
            raise _ProblemError(f"{what}.weights.{key}: >= 0, got {weight}")
    if sum(parsed.values()) <= 0:
        raise _ProblemError(f"{what}.weights: at least one weight > 0")
    return FieldSimulation(weights=parsed)


def _parse_simulator(value: object, fields: Mapping[str, FieldSpec]) -> SimulatorSpec:
    entry = _keys(
        value,
        {
            "id_prefix": True,
            "behaviour": False,
            "mains_powered": False,
            "battery_drain_pct_per_day": False,
            "fields": False,
        },
        "key 'simulator'",
    )
    prefix = _name(entry["id_prefix"], _ID_PREFIX, "simulator.id_prefix")
    behaviour = entry.get("behaviour", "generic")
    if behaviour not in BUILTIN_BEHAVIOURS:
        raise _ProblemError(
            f"simulator.behaviour: one of {list(BUILTIN_BEHAVIOURS)}, got {_shown(behaviour)}"
        )
    mains = _bool(entry.get("mains_powered", False), "simulator.mains_powered")
    drain = float(_number(entry.get("battery_drain_pct_per_day", 0.05), "simulator.battery_drain"))
    if not 0 <= drain <= 100:
        raise _ProblemError(f"simulator.battery_drain_pct_per_day: 0 to 100, got {drain}")
    simulated: dict[str, FieldSimulation] = {}
    raw_fields = entry.get("fields", {})
    if not isinstance(raw_fields, dict):
        raise _ProblemError("simulator.fields: a mapping of field name to how it is drawn")
    if raw_fields and behaviour != "generic":
        raise _ProblemError(f"simulator.fields: only for the generic behaviour, not {behaviour!r}")
    for name, raw in raw_fields.items():
        try:
            simulated[str(name)] = _parse_field_simulation(str(name), raw, fields.get(str(name)))
        except _ProblemError as exc:
            raise _ProblemError(str(exc), field_name=str(name)) from None
    return SimulatorSpec(
        id_prefix=prefix,
        behaviour=behaviour,
        mains_powered=mains,
        battery_drain_pct_per_day=drain,
        fields=simulated,
    )


def _whole(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _ProblemError(f"{what}: a whole number, got {_shown(value)}")
    if not low <= value <= high:
        raise _ProblemError(f"{what}: {low} to {high}, got {value}")
    return value


def _kind_name(name: object, expected_name: str | None) -> str:
    if not isinstance(name, str) or not _KIND_NAME.fullmatch(name):
        raise _ProblemError(f"bad name {_shown(name)}: must match {KIND_NAME_PATTERN}")
    if expected_name is not None and name != expected_name:
        raise _ProblemError(f"bad name {name!r}: the file of kind {name!r} is {name}.yaml")
    return name


def _build_kind(entry: Mapping[str, Any], name: str, source: str) -> KindSpec:
    if entry["version"] != KIND_FILE_VERSION:
        raise _ProblemError(
            f"key 'version': must be {KIND_FILE_VERSION}, got {_shown(entry['version'])}"
        )
    model = _name(entry["smart_data_model"], _SDM_NAME, "key 'smart_data_model'")
    fields = _parse_fields(entry["fields"], model)
    by_name = {f.name: f for f in fields}
    kpis = _parse_kpis(entry["kpis"], by_name) if "kpis" in entry else ()
    return KindSpec(
        name=name,
        title=_text(entry["title"], "key 'title'", limit=80),
        description=_text(entry["description"], "key 'description'"),
        reporting_interval_s=_whole(
            entry["reporting_interval_s"], "key 'reporting_interval_s'", 1, MAX_REPORTING_INTERVAL_S
        ),
        smart_data_model=model,
        fields=fields,
        simulator=_parse_simulator(entry["simulator"], by_name),
        retention_days=_whole(entry.get("retention_days", 90), "key 'retention_days'", 1, 36_500),
        kpis=kpis,
        panels=_parse_dashboard(entry["dashboard"], by_name, kpis) if "dashboard" in entry else (),
        source=source,
    )


def parse_kind(text: str, *, source: str, expected_name: str | None = None) -> KindSpec:
    """Check one kind file's text; raises KindFileError (one line: file, kind, field)."""
    kind: str | None = expected_name
    try:
        entry = _keys(read_document(text), _KIND_KEYS, "the kind file")
        kind = _kind_name(entry["name"], expected_name)
        return _build_kind(entry, kind, source)
    except _ProblemError as exc:
        raise KindFileError(source, str(exc), kind=kind, field_name=exc.field_name) from None


def read_kind_file(path: Path) -> KindSpec:
    """Read and check `<folder>/<kind>.yaml`; raises KindFileError."""
    source = str(path)
    expected = path.name.removesuffix(KIND_FILE_SUFFIX)
    try:
        size = path.stat().st_size
        if size > MAX_KIND_FILE_BYTES:
            raise KindFileError(source, f"{size} bytes, more than {MAX_KIND_FILE_BYTES}")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KindFileError(source, f"cannot read the kind file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise KindFileError(source, f"not UTF-8 text: {exc}") from exc
    if not _KIND_NAME.fullmatch(expected):
        raise KindFileError(
            source,
            f"bad name: a kind file is <kind>{KIND_FILE_SUFFIX}, <kind> matching "
            f"{KIND_NAME_PATTERN}",
        )
    return parse_kind(text, source=source, expected_name=expected)
