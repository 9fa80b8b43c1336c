"""`cityops simulate` flags and settings."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import CollectorRegistry

from cityops.common.events import parse_reading
from cityops.common.service import ConfigError
from cityops.simulator.city import build_city
from cityops.simulator.faults import INJECTABLE
from cityops.simulator.fleet import Fleet, SimClock
from cityops.simulator.main import (
    RunOptions,
    RunSummary,
    SimulatorMetrics,
    _Runner,
    build_parser,
    main,
    options_from_args,
)
from cityops.simulator.publisher import PublishStats
from cityops.simulator.settings import SimulatorSettings


def options(*argv: str) -> RunOptions:
    return options_from_args(build_parser().parse_args(list(argv)))


def test_demo_flags() -> None:
    parsed = options(
        "--devices-per-kind", "50", "--accelerate", "60", "--faults", "all", "--id-prefix", "demo-"
    )
    assert parsed.devices_per_kind == 50
    assert parsed.accelerate == 60.0
    assert parsed.faults == INJECTABLE
    assert parsed.rate is None and parsed.mode == "gateway"


def test_custom_centre_keeps_a_time_zone() -> None:
    parsed = options("--centre", "48.8566,2.3522", "--timezone", "Europe/Paris")
    assert (parsed.place.lat, parsed.place.lon, parsed.place.timezone) == (
        48.8566,
        2.3522,
        "Europe/Paris",
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--devices-per-kind", "0"], "devices-per-kind"),
        (["--mode", "device", "--devices-per-kind", "5000"], "one connection per device"),
        (["--connections", "0"], "connections"),
    ],
)
def test_bad_flags_say_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        options(*argv)


def test_bad_centre_and_rate_are_refused_by_the_parser() -> None:
    parser = build_parser()
    with pytest.raises(ConfigError, match="--centre: latitude must be"):
        parser.parse_args(["--centre", "95,2"])
    with pytest.raises(ConfigError, match="--rate: must be > 0"):
        parser.parse_args(["--rate", "-3"])


def test_settings_hide_secrets_and_check_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITYOPS_MQTT_URL", "mqtt://127.0.0.1:1883")
    monkeypatch.setenv("CITYOPS_SIMULATOR_MQTT_PASSWORD", "s3cret-gw")
    monkeypatch.setenv("CITYOPS_API_URL", "http://127.0.0.1:8000/")
    monkeypatch.setenv("CITYOPS_API_BOOTSTRAP_KEY", "boot-key")
    monkeypatch.delenv("CITYOPS_API_KEY", raising=False)
    settings = SimulatorSettings()
    assert "s3cret-gw" not in repr(settings)
    assert settings.api_url == "http://127.0.0.1:8000"
    assert settings.mqtt_port == 1883
    key = settings.admin_key()
    assert key is not None and key.get_secret_value() == "boot-key"
    monkeypatch.setenv("CITYOPS_MQTT_URL", "http://nope")
    with pytest.raises(ValueError, match="mqtt://"):
        SimulatorSettings()


def test_bare_faults_flag_means_all() -> None:
    assert options("--faults").faults == INJECTABLE
    assert options().faults == ()


def test_the_city_follows_the_rules_settings_unless_a_flag_says_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CITYOPS_MQTT_URL", "mqtt://127.0.0.1:1883")
    monkeypatch.setenv("CITYOPS_CITY_LAT", "48.8566")
    monkeypatch.setenv("CITYOPS_CITY_LON", "2.3522")
    monkeypatch.setenv("CITYOPS_CITY_TZ", "Europe/Paris")
    place = SimulatorSettings().place()
    assert place is not None and place.timezone == "Europe/Paris"
    parser = build_parser()
    assert options_from_args(parser.parse_args([]), place).place == place
    assert options_from_args(parser.parse_args(["--city", "oslo"]), place).place.name == "Oslo"
    assert options_from_args(parser.parse_args([])).place.name == "Amsterdam"


class RecordingPublisher:
    """Stands in for an MQTT connection: records what would be published."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, str, bytes]] = []
        self.connected = True

    async def publish(self, topic: str, payload: bytes) -> None:
        self.sent.append((time.monotonic(), topic, payload))


async def test_an_accelerated_replay_catches_up_then_runs_live() -> None:
    options = RunOptions(devices_per_kind=1, districts=1, accelerate=100_000.0, incidents=False)
    city = build_city(place=options.place, devices_per_kind=1, district_count=1)
    wall = datetime.now(UTC)
    clock = SimClock.starting(wall, accelerate=options.accelerate)
    fleet = Fleet(city, start=clock.now(wall), radio_effects=False, early_incidents=False)
    stop = asyncio.Event()
    recorder = RecordingPublisher()
    runner = _Runner(
        options=options,
        fleet=fleet,
        clock=clock,
        publishers=[recorder],  # type: ignore[list-item]
        metrics=SimulatorMetrics(CollectorRegistry()),
        stop=stop,
        summary=RunSummary(stats=PublishStats(), fleet_devices=len(fleet), duration_s=0.0),
        on_message=None,
    )
    task = asyncio.create_task(runner.publish_loop())
    await asyncio.sleep(2.0)  # a simulated day takes 0.86 s at this speed
    stop.set()
    await task
    assert runner.live
    stamps = [parse_reading(payload).ts for _, _, payload in recorder.sent]
    assert len(stamps) > 500  # the replay: a day of readings in under a second
    assert stamps[0] < wall - timedelta(hours=20)
    assert max(stamps) <= datetime.now(UTC)  # never in the future (clock_skew)
    assert max(stamps) > wall - timedelta(seconds=5)
    last_half_second = [at for at, _, _ in recorder.sent if at > time.monotonic() - 0.5]
    assert len(last_half_second) <= 4  # live: the parking spot reports once a minute


def test_missing_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CITYOPS_MQTT_URL", raising=False)
    assert main(["--devices-per-kind", "2"]) == 2
    assert "CITYOPS_MQTT_URL: required, not set" in capsys.readouterr().err
