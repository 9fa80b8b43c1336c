"""Per-device rule profiles: the rule set with district, zone and device overrides applied.

Override format (registry metadata, JSON):

- device `metadata`:   {"rules": {"bin_full": {"raise": 85}, "battery_low": {"enabled": false}}}
- district `metadata`: {"rules": {...},
                        "zones": {"<zone>": {"rules": {"overstay": {"for_s": 3600}}}}}

Precedence, lowest first: the rule file, the district, the device's zone in that district, the
device. Keys are a rule's `params` names plus `enabled`. Invalid keys are reported and ignored.
Most devices share a profile, so profiles are cached by their effective overrides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from cityops.common.kinds import Kind
from cityops.rules.config import CompiledRule, ParamValue, RuleSet, compile_rule, validate_override

UNASSIGNED_DISTRICT = "unassigned"


@dataclass(frozen=True, slots=True)
class Profile:
    """What the engine needs to know about one device."""

    kind: Kind
    district: str
    interval_s: float
    rules: tuple[CompiledRule, ...]
    offline: CompiledRule | None
    by_id: Mapping[str, CompiledRule] = field(default_factory=dict)

    @property
    def offline_after_s(self) -> float | None:
        """Silence after which the device is offline, or None without an offline rule."""
        return None if self.offline is None else self.offline.intervals * self.interval_s


def _rules_of(metadata: object) -> Mapping[str, Any]:
    if isinstance(metadata, Mapping):
        rules = metadata.get("rules")
        if isinstance(rules, Mapping):
            return rules
    return {}


def _zone_rules(district_metadata: object, zone: str | None) -> Mapping[str, Any]:
    if zone is None or not isinstance(district_metadata, Mapping):
        return {}
    zones = district_metadata.get("zones")
    if not isinstance(zones, Mapping):
        return {}
    return _rules_of(zones.get(zone))


class ProfileBook:
    """Builds and shares profiles for a rule set."""

    def __init__(self, ruleset: RuleSet) -> None:
        self._ruleset = ruleset
        self._specs = ruleset.by_id()
        self._cache: dict[tuple[Kind, str, float, bytes], Profile] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def profile(
        self,
        *,
        kind: Kind,
        district: str = UNASSIGNED_DISTRICT,
        zone: str | None = None,
        interval_s: float,
        device_metadata: object = None,
        district_metadata: object = None,
    ) -> tuple[Profile, list[str]]:
        """The device's profile and the problems found in its overrides (already ignored)."""
        layers = (
            ("district", _rules_of(district_metadata)),
            (f"zone {zone}", _zone_rules(district_metadata, zone)),
            ("device", _rules_of(device_metadata)),
        )
        merged: dict[str, dict[str, ParamValue]] = {}
        problems: list[str] = []
        for layer, overrides in layers:
            for rule_id, override in overrides.items():
                spec = self._specs.get(rule_id)
                if spec is None:
                    problems.append(f"{layer}: unknown rule {rule_id!r}")
                    continue
                kept, found = validate_override(spec, override)
                problems += [f"{layer}: {problem}" for problem in found]
                merged.setdefault(rule_id, {}).update(kept)
        key = (kind, district, interval_s, orjson.dumps(merged, option=orjson.OPT_SORT_KEYS))
        cached = self._cache.get(key)
        if cached is None:
            cached = self._build(kind, district, interval_s, merged)
            self._cache[key] = cached
        return cached, problems

    def _build(
        self,
        kind: Kind,
        district: str,
        interval_s: float,
        merged: Mapping[str, Mapping[str, ParamValue]],
    ) -> Profile:
        rules: list[CompiledRule] = []
        offline: CompiledRule | None = None
        for spec in self._ruleset.for_kind(kind):
            overrides = dict(merged.get(spec.id, {}))
            if overrides.pop("enabled", True) is False:
                continue
            compiled = compile_rule(spec, overrides)
            if spec.type == "offline":
                offline = compiled
            else:
                rules.append(compiled)
        by_id = {rule.id: rule for rule in rules}
        if offline is not None:
            by_id[offline.id] = offline
        return Profile(
            kind=kind,
            district=district,
            interval_s=interval_s,
            rules=tuple(rules),
            offline=offline,
            by_id=by_id,
        )
