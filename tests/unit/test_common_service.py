"""common/service.py: settings problems as one line naming the variables, flags, exit codes."""

from __future__ import annotations

import os
from typing import ClassVar

import pytest
from pydantic import Field, SecretStr

from cityops.common.service import (
    ConfigError,
    ServiceParser,
    entry_point,
    env_name,
    load_settings,
    one_line,
)
from cityops.common.settings import KafkaSettings


class _Settings(KafkaSettings):
    kafka_principal: ClassVar[str] = "rules"

    widget_count: int = Field(default=1, ge=1, le=10)
    widget_secret: SecretStr = Field(min_length=8)


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CITYOPS_"):
            monkeypatch.delenv(name)


def test_a_field_is_named_by_its_variable() -> None:
    assert env_name(_Settings, "widget_count", {}) == "CITYOPS_WIDGET_COUNT"
    assert env_name(_Settings, "kafka_username", {}) == "CITYOPS_KAFKA_USERNAME"


def test_a_kafka_credential_is_named_by_the_services_own_variable_when_that_is_set() -> None:
    own = {"CITYOPS_RULES_KAFKA_USERNAME": "rules"}
    assert env_name(_Settings, "kafka_username", own) == "CITYOPS_RULES_KAFKA_USERNAME"
    assert env_name(_Settings, "kafka_bootstrap", own) == "CITYOPS_KAFKA_BOOTSTRAP"


def test_problems_are_one_line_with_every_variable_and_no_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _clear_env(monkeypatch)
    monkeypatch.setenv("CITYOPS_WIDGET_COUNT", "eleven-thousand")
    monkeypatch.setenv("CITYOPS_WIDGET_SECRET", "short")  # too short, and a secret
    with pytest.raises(ConfigError) as caught:
        load_settings(_Settings)
    text = str(caught.value)
    assert "\n" not in text
    assert "CITYOPS_KAFKA_BOOTSTRAP: required, not set (host:port" in text
    assert "CITYOPS_WIDGET_COUNT: Input should be a valid integer" in text
    assert "CITYOPS_WIDGET_SECRET: " in text
    assert "eleven-thousand" not in text
    assert "short'" not in text and "'short" not in text


def test_valid_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_env(monkeypatch)
    monkeypatch.setenv("CITYOPS_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    monkeypatch.setenv("CITYOPS_WIDGET_SECRET", "long-enough")
    monkeypatch.setenv("CITYOPS_WIDGET_COUNT", "3")
    settings = load_settings(_Settings)
    assert (settings.widget_count, settings.kafka_bootstrap) == (3, "127.0.0.1:9092")


def test_a_parser_error_is_a_config_error_not_an_exit() -> None:
    parser = ServiceParser(prog="cityops demo")
    parser.add_argument("--count", type=int)
    with pytest.raises(ConfigError, match=r"--count: invalid int value.*\(see --help\)"):
        parser.parse_args(["--count", "many"])


def test_entry_point_prints_one_line_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    @entry_point("cityops demo")
    def main(argv: list[str]) -> int:
        if argv:
            raise ConfigError("first problem\n  second problem\n")
        return 0

    assert main([]) == 0
    assert main(["bad"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "cityops demo: first problem; second problem\n"


def test_one_line_joins_lines() -> None:
    assert one_line("a\n\n  b  \nc") == "a; b; c"
