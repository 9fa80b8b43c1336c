"""The rule file: the shipped defaults match A6; bad files fail with file, rule and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from cityops.common.kinds import Kind, Priority
from cityops.rules.config import (
    RuleFileError,
    compile_rule,
    default_rules_path,
    load_rules,
    parse_duration,
    parse_rules,
    validate_override,
)

A6 = {
    # rule: (kinds, priority, department, SLA seconds)
    "bin_full": ({Kind.WASTEBIN}, "P3", "sanitation", 4 * 3600),
    "bin_fire": ({Kind.WASTEBIN}, "P1", "sanitation", 15 * 60),
    "bin_tipped": ({Kind.WASTEBIN}, "P3", "sanitation", 8 * 3600),
    "lamp_fault": ({Kind.STREETLIGHT}, "P3", "street_lighting", 48 * 3600),
    "lamp_out": ({Kind.STREETLIGHT}, "P3", "street_lighting", 48 * 3600),
    "cover_open": ({Kind.MANHOLE}, "P1", "municipal_works", 3600),
    "overflow_risk": ({Kind.MANHOLE}, "P1", "drainage", 3600),
    "gas_hazard": ({Kind.MANHOLE}, "P1", "municipal_works", 30 * 60),
    "overstay": ({Kind.PARKING}, "P4", "traffic", 3600),
    "battery_low": (set(Kind), "P4", "field_service", 7 * 86400),
    "device_offline": (set(Kind), "P3", "field_service", 86400),
}

VALID = """
version: 1
rules:
  - id: bin_full
    kinds: [wastebin]
    priority: P3
    department: sanitation
    sla: 4h
    params: {raise: 90, clear: 30}
    raise: {all: ["fill_pct >= $raise"]}
    clear: {all: ["fill_pct < $clear"]}
"""


def test_shipped_defaults_are_a6() -> None:
    rules = load_rules().by_id()
    assert set(rules) == set(A6)
    for rule_id, (kinds, priority, department, sla_s) in A6.items():
        rule = rules[rule_id]
        assert rule.kinds == frozenset(kinds), rule_id
        assert rule.priority == Priority(priority), rule_id
        assert rule.department == department, rule_id
        assert rule.sla_s == sla_s, rule_id
    assert rules["bin_tipped"].for_s == 60
    assert rules["lamp_out"].for_s == 600
    assert rules["lamp_out"].schedule == "dusk_dawn"
    assert rules["overstay"].for_s == 7200
    assert rules["device_offline"].type == "offline"
    assert rules["device_offline"].params["intervals"] == 3


def test_default_rules_are_package_data() -> None:
    import cityops.rules

    assert default_rules_path().parent == Path(cityops.rules.__file__).resolve().parent
    assert default_rules_path().is_file()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("fill_pct >= $raise", "fill >= $raise"), "rules[0] (bin_full): field 'raise'"),
        (("fill_pct >= $raise", "fill >= $raise"), "unknown field 'fill'"),
        (("fill_pct >= $raise", "fill_pct >= $rise"), "unknown parameter $rise"),
        (("fill_pct >= $raise", "fill_pct => $raise"), "operator must be one of"),
        (("fill_pct >= $raise", "fill_pct >= true"), "fill_pct is a number"),
        (("priority: P3", "priority: P7"), "field 'priority'"),
        (("sla: 4h", "sla: soon"), "field 'sla'"),
        (("kinds: [wastebin]", "kinds: [bench]"), "unknown kind"),
        (("department: sanitation", "department: Sanitation Dept"), "field 'department'"),
        (("    clear:", "    colour: red\n    clear:"), "unknown keys ['colour']"),
        (("version: 1", "version: 2"), "'version' must be 1"),
        (('{all: ["fill_pct < $clear"]}', "fill_pct < 30"), "field 'clear'"),
    ],
)
def test_bad_rule_files_name_the_rule_and_field(edit: tuple[str, str], message: str) -> None:
    text = VALID.replace(*edit)
    assert text != VALID
    with pytest.raises(RuleFileError) as caught:
        parse_rules(text, source="city.yaml")
    assert str(caught.value).startswith("city.yaml")
    assert message in str(caught.value)


def test_duplicate_ids_and_yaml_errors_are_reported() -> None:
    doubled = VALID + VALID.split("rules:\n", 1)[1]
    with pytest.raises(RuleFileError, match="duplicate rule id 'bin_full'"):
        parse_rules(doubled)
    with pytest.raises(RuleFileError, match="not valid YAML"):
        parse_rules("version: 1\nrules: [\n")


def test_unreadable_file_is_a_rule_file_error(tmp_path: Path) -> None:
    with pytest.raises(RuleFileError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")


def test_durations() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration(2.5) == 2.5
    for bad in ("0s", "-1m", "ten minutes", True, "400d"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_conditions_are_three_valued() -> None:
    rules = load_rules().by_id()
    cover = compile_rule(rules["cover_open"])
    assert cover.raise_when is not None and cover.clear_when is not None
    assert cover.raise_when.evaluate({"cover_open": True}) is True
    assert cover.raise_when.evaluate({"cover_open": False, "tilt_deg": 20.0}) is True
    assert cover.raise_when.evaluate({"cover_open": False, "tilt_deg": 3.0}) is False
    # a manhole without a tilt sensor clears on the cover alone
    assert cover.clear_when.evaluate({"cover_open": False}) is True
    assert cover.clear_when.evaluate({"cover_open": False, "tilt_deg": 8.0}) is False
    battery = compile_rule(rules["battery_low"])
    assert battery.raise_when is not None
    assert battery.raise_when.evaluate({"occupied": True}) is None


def test_overrides_apply_and_bad_ones_are_reported() -> None:
    spec = load_rules().by_id()["bin_full"]
    kept, problems = validate_override(
        spec, {"raise": 80, "clear": "low", "colour": 1, "enabled": "yes"}
    )
    assert kept == {"raise": 80.0}
    assert len(problems) == 3
    compiled = compile_rule(spec, kept)
    assert compiled.raise_when is not None
    assert compiled.raise_when.evaluate({"fill_pct": 85.0}) is True
    assert compile_rule(spec).raise_when.evaluate({"fill_pct": 85.0}) is False  # type: ignore[union-attr]
