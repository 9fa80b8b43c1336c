"""The rule file: load and validate YAML into typed rules, and apply per-district/device overrides.

A bad rule file stops the service at start with a message naming the file, the rule and the
field. Bad overrides in the registry (data that operators edit at run time) never stop the
service: they are reported and ignored, and the rule's defaults apply.
"""

from __future__ import annotations

import operator
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from cityops.common.events import (
    ManholeReading,
    ParkingReading,
    StreetlightReading,
    WastebinReading,
)
from cityops.common.kinds import Kind, Priority

MAX_RULE_FILE_BYTES = 1 << 20
MAX_RULES = 200
MAX_CLAUSES = 16
RULE_ID_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_READING_MODELS: dict[Kind, type[BaseModel]] = {
    Kind.STREETLIGHT: StreetlightReading,
    Kind.MANHOLE: ManholeReading,
    Kind.WASTEBIN: WastebinReading,
    Kind.PARKING: ParkingReading,
}
_COMMON_FIELDS = frozenset({"device_id", "kind", "ts", "seq"})

FieldType = Literal["number", "bool", "text"]
ParamValue = float | bool | str
Op = Callable[[Any, Any], bool]
OPS: dict[str, Op] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
}


class RuleFileError(ValueError):
    """The rule file cannot be used; the message names the file, rule and field."""


class _InvalidError(ValueError):
    """One invalid part of a rule; wrapped into RuleFileError with its location."""


def _field_type(annotation: Any) -> FieldType:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in {typing.Union, types.UnionType} and len(args) == 1:
        return _field_type(args[0])
    if annotation is bool:
        return "bool"
    if typing.get_origin(annotation) is Literal or annotation is str:
        return "text"
    if typing.get_origin(annotation) is typing.Annotated:
        return _field_type(args[0])
    return "number"


def reading_fields(kind: Kind) -> dict[str, FieldType]:
    """The measured fields a reading of `kind` may carry, with their types."""
    model = _READING_MODELS[kind]
    return {
        name: _field_type(info.annotation)
        for name, info in model.model_fields.items()
        if name not in _COMMON_FIELDS
    }


def parse_duration(value: object) -> float:
    """'90s', '15m', '4h', '7d' or a number of seconds -> seconds (> 0)."""
    if isinstance(value, bool):
        raise _InvalidError(f"expected a duration like '15m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value.strip())):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise _InvalidError(f"expected a duration like '90s', '15m', '4h' or '7d', got {value!r}")
    if not 0 < seconds <= 366 * 86400:
        raise _InvalidError(f"duration must be between 0 and 366 days, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Clause:
    """`field op value`, where value may name a parameter ($name)."""

    field: str
    op: str
    value: ParamValue | None
    param: str | None = None

    def __str__(self) -> str:
        shown = f"${self.param}" if self.param else self.value
        return f"{self.field} {self.op} {shown}"


@dataclass(frozen=True, slots=True)
class Condition:
    """Clauses combined with `any` or `all` (three-valued: a missing field is unknown)."""

    mode: Literal["any", "all"]
    clauses: tuple[Clause, ...]


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One validated rule of the rule file, parameters not yet applied."""

    id: str
    type: Literal["condition", "offline"]
    kinds: frozenset[Kind]
    priority: Priority
    department: str
    sla_s: float
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    raise_when: Condition | None = None
    clear_when: Condition | None = None
    for_s: float | None = None
    for_param: str | None = None
    schedule: Literal["dusk_dawn"] | None = None


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Every rule of a file, in file order."""

    source: str
    rules: tuple[RuleSpec, ...]

    def by_id(self) -> dict[str, RuleSpec]:
        """Rules keyed by id."""
        return {rule.id: rule for rule in self.rules}

    def for_kind(self, kind: Kind) -> tuple[RuleSpec, ...]:
        """The rules that apply to a kind, in file order."""
        return tuple(rule for rule in self.rules if kind in rule.kinds)


def default_rules_path() -> Path:
    """The shipped rule file (cityops/rules/default.yaml, package data)."""
    return Path(str(resources.files("cityops.rules") / "default.yaml"))


def load_rules(path: Path | None = None) -> RuleSet:
    """Read and validate a rule file (the shipped defaults when `path` is None)."""
    path = path or default_rules_path()
    try:
        size = path.stat().st_size
        if size > MAX_RULE_FILE_BYTES:
            raise RuleFileError(f"{path}: {size} bytes, more than {MAX_RULE_FILE_BYTES}")
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RuleFileError(f"{path}: cannot read the rule file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise RuleFileError(f"{path}: not UTF-8 text: {exc}") from exc
    return parse_rules(text, source=str(path))


def parse_rules(text: str, *, source: str = "<rules>") -> RuleSet:
    """Validate rule-file text; raises RuleFileError naming source, rule and field."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleFileError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict):
        raise RuleFileError(f"{source}: expected a mapping with 'version' and 'rules'")
    unknown = set(document) - {"version", "rules"}
    if unknown:
        raise RuleFileError(f"{source}: unknown top-level keys {sorted(unknown)}")
    if document.get("version") != 1:
        raise RuleFileError(f"{source}: 'version' must be 1, got {document.get('version')!r}")
    entries = document.get("rules")
    if not isinstance(entries, list) or not entries:
        raise RuleFileError(f"{source}: 'rules' must be a non-empty list")
    if len(entries) > MAX_RULES:
        raise RuleFileError(f"{source}: {len(entries)} rules, at most {MAX_RULES} allowed")
    rules: list[RuleSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"{source}: rules[{index}]"
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            where += f" ({entry['id']})"
        try:
            rule = _parse_rule(entry)
        except ValueError as exc:
            raise RuleFileError(f"{where}: {exc}") from exc
        if rule.id in seen:
            raise RuleFileError(f"{where}: duplicate rule id {rule.id!r}")
        seen.add(rule.id)
        rules.append(rule)
    if sum(rule.type == "offline" for rule in rules) > 1:
        raise RuleFileError(f"{source}: at most one rule may have type 'offline'")
    return RuleSet(source=source, rules=tuple(rules))


_RULE_KEYS = frozenset(
    {
        "id",
        "type",
        "kinds",
        "priority",
        "department",
        "sla",
        "params",
        "raise",
        "clear",
        "for",
        "schedule",
    }
)


def _parse_rule(entry: object) -> RuleSpec:
    if not isinstance(entry, dict):
        raise _InvalidError("each rule must be a mapping")
    unknown = set(entry) - _RULE_KEYS
    if unknown:
        raise _InvalidError(f"unknown keys {sorted(unknown)}; allowed: {sorted(_RULE_KEYS)}")
    rule_id = entry.get("id")
    if not isinstance(rule_id, str) or not RULE_ID_PATTERN.match(rule_id):
        raise _InvalidError(f"field 'id': must match {RULE_ID_PATTERN.pattern}, got {rule_id!r}")
    rule_type = entry.get("type", "condition")
    if rule_type not in {"condition", "offline"}:
        raise _InvalidError(f"field 'type': 'condition' or 'offline', got {rule_type!r}")
    kinds = _parse_kinds(entry.get("kinds"))
    try:
        priority = Priority(str(entry.get("priority")))
    except ValueError:
        raise _InvalidError(
            f"field 'priority': one of P1..P4, got {entry.get('priority')!r}"
        ) from None
    department = entry.get("department")
    if not isinstance(department, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", department):
        raise _InvalidError(f"field 'department': a lower_snake_case name, got {department!r}")
    try:
        sla_s = parse_duration(entry.get("sla"))
    except ValueError as exc:
        raise _InvalidError(f"field 'sla': {exc}") from None
    params = _parse_params(entry.get("params", {}))
    if rule_type == "offline":
        for key in ("raise", "clear", "for", "schedule"):
            if key in entry:
                raise _InvalidError(f"field {key!r}: not used by an 'offline' rule")
        intervals = params.get("intervals", 3)
        if isinstance(intervals, bool) or not isinstance(intervals, float | int) or intervals <= 0:
            raise _InvalidError(f"params 'intervals': a number > 0, got {intervals!r}")
        return RuleSpec(
            id=rule_id,
            type="offline",
            kinds=kinds,
            priority=priority,
            department=department,
            sla_s=sla_s,
            params={**params, "intervals": float(intervals)},
        )
    fields = _fields_of(kinds)
    raise_when = _parse_condition(entry.get("raise"), "raise", fields, params)
    clear_when = _parse_condition(entry.get("clear"), "clear", fields, params)
    for_s, for_param = _parse_for(entry.get("for"), params)
    schedule = entry.get("schedule")
    if schedule not in {None, "dusk_dawn"}:
        raise _InvalidError(f"field 'schedule': only 'dusk_dawn' is supported, got {schedule!r}")
    return RuleSpec(
        id=rule_id,
        type="condition",
        kinds=kinds,
        priority=priority,
        department=department,
        sla_s=sla_s,
        params=params,
        raise_when=raise_when,
        clear_when=clear_when,
        for_s=for_s,
        for_param=for_param,
        schedule=schedule,
    )


def _parse_kinds(value: object) -> frozenset[Kind]:
    if value == "all":
        return frozenset(Kind)
    if not isinstance(value, list) or not value:
        raise _InvalidError(f"field 'kinds': a list of kinds or 'all', got {value!r}")
    try:
        return frozenset(Kind(kind) for kind in value)
    except ValueError:
        raise _InvalidError(
            f"field 'kinds': unknown kind in {value!r}; known: {sorted(k.value for k in Kind)}"
        ) from None


def _parse_params(value: object) -> dict[str, ParamValue]:
    if not isinstance(value, dict):
        raise _InvalidError(f"field 'params': a mapping of name to value, got {value!r}")
    params: dict[str, ParamValue] = {}
    for name, param in value.items():
        if not isinstance(name, str) or not RULE_ID_PATTERN.match(name) or name == "enabled":
            raise _InvalidError(f"params: bad parameter name {name!r}")
        if isinstance(param, bool | str):
            params[name] = param
        elif isinstance(param, int | float):
            params[name] = float(param)
        else:
            raise _InvalidError(f"params {name!r}: a number, true/false or a word, got {param!r}")
    return params


def _fields_of(kinds: frozenset[Kind]) -> dict[str, FieldType]:
    fields: dict[str, FieldType] = {}
    for kind in kinds:
        fields.update(reading_fields(kind))
    return fields


def _parse_value(token: str, params: Mapping[str, ParamValue]) -> tuple[ParamValue, str | None]:
    if token.startswith("$"):
        name = token[1:]
        if name not in params:
            raise _InvalidError(f"unknown parameter ${name}; declared: {sorted(params) or 'none'}")
        return params[name], name
    if token in {"true", "false"}:
        return token == "true", None  # noqa: S105 - a boolean literal, not a password
    try:
        return float(token), None
    except ValueError:
        return token, None


def _check_type(clause: Clause, value: ParamValue, ftype: FieldType) -> None:
    if ftype == "number":
        if isinstance(value, bool) or not isinstance(value, float):
            raise _InvalidError(f"'{clause}': {clause.field} is a number, compared with {value!r}")
    elif ftype == "bool":
        if not isinstance(value, bool) or clause.op not in {"==", "!="}:
            raise _InvalidError(f"'{clause}': {clause.field} is true/false; use == or !=")
    elif not isinstance(value, str) or clause.op not in {"==", "!="}:
        raise _InvalidError(f"'{clause}': {clause.field} is a word; use == or != with a word")


def _parse_condition(
    value: object, name: str, fields: Mapping[str, FieldType], params: Mapping[str, ParamValue]
) -> Condition:
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in {"any", "all"}:
        raise _InvalidError(f"field {name!r}: expected {{any: [...]}} or {{all: [...]}}")
    mode, items = next(iter(value.items()))
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_CLAUSES:
        raise _InvalidError(f"field {name!r}: 1 to {MAX_CLAUSES} clauses")
    clauses = []
    for item in items:
        parts = item.split() if isinstance(item, str) else []
        if len(parts) != 3:
            raise _InvalidError(f"field {name!r}: clause {item!r} is not '<field> <op> <value>'")
        field_name, op, token = parts
        if field_name not in fields:
            raise _InvalidError(
                f"field {name!r}: clause {item!r}: unknown field {field_name!r}; "
                f"fields of these kinds: {sorted(fields)}"
            )
        if op not in OPS:
            raise _InvalidError(
                f"field {name!r}: clause {item!r}: operator must be one of {list(OPS)}"
            )
        try:
            resolved, param = _parse_value(token, params)
            clause = Clause(field=field_name, op=op, value=resolved, param=param)
            _check_type(clause, resolved, fields[field_name])
        except ValueError as exc:
            raise _InvalidError(f"field {name!r}: clause {item!r}: {exc}") from None
        clauses.append(clause)
    return Condition(mode=mode, clauses=tuple(clauses))


def _parse_for(value: object, params: Mapping[str, ParamValue]) -> tuple[float | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, str) and value.startswith("$"):
        name = value[1:]
        if name not in params:
            raise _InvalidError(f"field 'for': unknown parameter {value}")
        try:
            return parse_duration(params[name]), name
        except ValueError as exc:
            raise _InvalidError(f"field 'for': parameter {value}: {exc}") from None
    try:
        return parse_duration(value), None
    except ValueError as exc:
        raise _InvalidError(f"field 'for': {exc}") from None


# Overrides ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledClause:
    """A clause with its parameter applied, ready to evaluate."""

    field: str
    compare: Op
    value: ParamValue


@dataclass(frozen=True, slots=True)
class CompiledCondition:
    """A condition with its parameters applied."""

    any_of: bool
    clauses: tuple[CompiledClause, ...]

    def evaluate(self, fields: Mapping[str, Any]) -> bool | None:
        """True / False, or None when no clause's field is present."""
        known = False
        for clause in self.clauses:
            value = fields.get(clause.field)
            if value is None:
                continue
            known = True
            holds = clause.compare(value, clause.value)
            if holds and self.any_of:
                return True
            if not holds and not self.any_of:
                return False
        if not known:
            return None
        return not self.any_of


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule with one device's parameters applied: what the engine evaluates."""

    spec: RuleSpec
    raise_when: CompiledCondition | None
    clear_when: CompiledCondition | None
    for_s: float | None
    intervals: float

    @property
    def id(self) -> str:
        """The rule id."""
        return self.spec.id


def compile_rule(spec: RuleSpec, overrides: Mapping[str, ParamValue] | None = None) -> CompiledRule:
    """Apply (already validated) parameter overrides to a rule."""
    params = {**spec.params, **(overrides or {})}

    def compiled(condition: Condition | None) -> CompiledCondition | None:
        if condition is None:
            return None
        return CompiledCondition(
            any_of=condition.mode == "any",
            clauses=tuple(
                CompiledClause(
                    field=c.field,
                    compare=OPS[c.op],
                    value=params[c.param] if c.param else c.value,  # type: ignore[arg-type]  # value set when param is None
                )
                for c in condition.clauses
            ),
        )

    for_s = spec.for_s
    if spec.for_param is not None:
        for_s = parse_duration(params[spec.for_param])
    intervals = params.get("intervals", 3.0)
    return CompiledRule(
        spec=spec,
        raise_when=compiled(spec.raise_when),
        clear_when=compiled(spec.clear_when),
        for_s=for_s,
        intervals=float(intervals) if isinstance(intervals, float | int) else 3.0,
    )


def validate_override(spec: RuleSpec, override: object) -> tuple[dict[str, ParamValue], list[str]]:
    """Keep the valid keys of one rule's override mapping; return them and the problems."""
    if not isinstance(override, dict):
        return {}, [f"{spec.id}: override must be a mapping, got {type(override).__name__}"]
    kept: dict[str, ParamValue] = {}
    problems: list[str] = []
    for name, value in override.items():
        if name == "enabled":
            if isinstance(value, bool):
                kept["enabled"] = value
            else:
                problems.append(f"{spec.id}.enabled: expected true/false, got {value!r}")
            continue
        if name not in spec.params:
            problems.append(f"{spec.id}.{name}: not a parameter (known: {sorted(spec.params)})")
            continue
        default = spec.params[name]
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"{spec.id}.{name}: expected a number, got {value!r}")
                continue
            if name in {spec.for_param, "intervals"} and not 0 < value <= 366 * 86400:
                problems.append(f"{spec.id}.{name}: must be > 0, got {value!r}")
                continue
            kept[name] = float(value)
        elif type(value) is type(default):
            kept[name] = value
        else:
            problems.append(f"{spec.id}.{name}: expected {type(default).__name__}, got {value!r}")
    return kept, problems
