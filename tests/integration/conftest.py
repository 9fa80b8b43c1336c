"""Fixtures for tests against the real native stack (`make stack-up` / `cityops stack up`).

Session-wide:
- `stack_env` -> dict[str, str]: the `CITYOPS_*` settings from `.stack/cityops.env`.
- `kafka_bootstrap` -> str: `host:port` of the broker.
- `kafka` -> StackKafka: the admin's access (`kafka.admin`) and each service's
  (`kafka.service("rules")`); build every Kafka client with `cityops.common.kafka`.
- `mqtt_settings` -> MqttSettings: broker address, service accounts, password-file paths.

Per test (factories clean up what they made):
- `kafka_topics` -> `await make_topics("city.telemetry.v1", partitions=3)` returns
  {base name: uuid-suffixed real name}; the topics are deleted after the test.
- `database_url` -> str: URL of a fresh database `t_<uuid>` cloned from a template with all
  migrations applied (`cityops.common.migrate.apply_migrations`); dropped after the test.
- `provision_mqtt_device` -> `await provision("wb-0042")` returns a fresh password; the device
  can CONNECT when it returns (devices file rewritten: the broker's auth plugin follows it, no
  signal); removed after.
- `own_broker` -> BrokerInstance: a started broker of the test's own (port 18830-18899, temp folder;
  tests/integration/broker_support.py) for tests that restart, kill or crash it.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio
from aiokafka.admin import NewTopic

from cityops.api.devices.credentials import BrokerFiles, apply_to_files
from cityops.common import mqtt_auth
from cityops.common.kafka import kafka_admin
from cityops.common.scratch import drop_database, quote_ident
from cityops.stack.credentials import parse_env_file
from cityops.stack.layout import StackPaths, repo_root
from cityops.stack.probes import mqtt_connect_reason
from tests.helpers import wait_for
from tests.integration.kafka_support import StackKafka

if TYPE_CHECKING:
    from cityops.stack.mosquitto_instance import BrokerInstance
    from tests.integration.api_support import ApiCase
    from tests.integration.ingest_support import IngestCase

MakeTopics = Callable[..., Awaitable[dict[str, str]]]
ProvisionDevice = Callable[[str], Awaitable[str]]

TEMPLATE_PREFIX = "cityops_test_template"
# pg_advisory_lock key for building the template: "cotmpl" in ASCII
_TEMPLATE_LOCK_KEY = 0x636F746D706C


@dataclass(frozen=True)
class MqttSettings:
    """Where Mosquitto listens and the files that hold its credentials."""

    host: str
    port: int
    ingest_username: str
    ingest_password: str
    gateway_username: str
    gateway_password: str
    device_password_file: Path
    lock_file: Path

    def __repr__(self) -> str:
        return f"MqttSettings(host={self.host!r}, port={self.port})"


@pytest.fixture(scope="session")
def stack_env() -> dict[str, str]:
    """The `CITYOPS_*` settings the native stack wrote to `.stack/cityops.env`."""
    env_file = StackPaths(repo=repo_root()).env_file
    if not env_file.exists():
        pytest.fail(
            f"{env_file} is missing: start the stack with `make stack-up` "
            "(or `cityops stack up` as root) before running integration tests",
            pytrace=False,
        )
    return parse_env_file(env_file.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def kafka_bootstrap(stack_env: Mapping[str, str]) -> str:
    """`host:port` of the Kafka broker."""
    return stack_env["CITYOPS_KAFKA_BOOTSTRAP"]


@pytest.fixture(scope="session")
def kafka(stack_env: Mapping[str, str]) -> StackKafka:
    """The stack's Kafka principals: `kafka.admin`, `kafka.service(name)`."""
    return StackKafka(stack_env)


@pytest_asyncio.fixture
async def kafka_topics(kafka: StackKafka) -> AsyncIterator[MakeTopics]:
    """Factory: create uuid-suffixed topics, deleted at teardown.

    `names = await kafka_topics("city.telemetry.v1", "city.deadletter.v1", partitions=3,
    configs={"cleanup.policy": "compact"})` -> {"city.telemetry.v1": "city.telemetry.v1.<hex>"}.
    """
    admin = kafka_admin(kafka.admin)
    await admin.start()
    created: list[str] = []

    async def make_topics(
        *base_names: str, partitions: int = 3, configs: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        suffix = uuid.uuid4().hex[:12]
        names = {base: f"{base}.{suffix}" for base in base_names}
        await admin.create_topics(
            [
                NewTopic(
                    name=name,
                    num_partitions=partitions,
                    replication_factor=1,
                    topic_configs=dict(configs or {}),
                )
                for name in names.values()
            ]
        )
        created.extend(names.values())

        async def all_listed() -> bool:
            return set(names.values()) <= set(await admin.list_topics())

        await wait_for(all_listed, timeout=15, interval=0.1, message=f"topics {names} created")
        return names

    try:
        yield make_topics
    finally:
        try:
            if created:
                await admin.delete_topics(created)
        finally:
            await admin.close()


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


@pytest_asyncio.fixture(scope="session")
async def database_template(stack_env: Mapping[str, str]) -> str:
    """Name of a database with every migration applied, to clone per test.

    Named `cityops_test_template_<migrations sha>`: concurrent test sessions on one stack share
    it, and a changed migration gets a fresh template. Built under a name of its own, then
    renamed, so a crashed build never leaves a half-migrated template behind.
    """
    from cityops.common.migrate import apply_migrations, load_migrations

    digest = hashlib.sha256(
        "".join(f"{m.name}:{m.checksum};" for m in load_migrations()).encode()
    ).hexdigest()[:16]
    template = f"{TEMPLATE_PREFIX}_{digest}"
    base_url = stack_env["CITYOPS_DATABASE_URL"]
    conn = await asyncpg.connect(base_url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _TEMPLATE_LOCK_KEY)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", template)
            if not exists:
                building = f"{TEMPLATE_PREFIX}_build_{uuid.uuid4().hex[:12]}"
                await conn.execute(f"CREATE DATABASE {quote_ident(building)}")
                build_conn = await asyncpg.connect(_with_database(base_url, building))
                try:
                    await apply_migrations(build_conn)
                finally:
                    await build_conn.close()
                await conn.execute(
                    f"ALTER DATABASE {quote_ident(building)} RENAME TO {quote_ident(template)}"
                )
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _TEMPLATE_LOCK_KEY)
    finally:
        await conn.close()
    return template


@pytest_asyncio.fixture
async def database_url(stack_env: Mapping[str, str], database_template: str) -> AsyncIterator[str]:
    """URL of a fresh, fully migrated database `t_<uuid>`, dropped after the test."""
    base_url = stack_env["CITYOPS_DATABASE_URL"]
    name = f"t_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(base_url)
    try:
        await admin.execute(
            f"CREATE DATABASE {quote_ident(name)} TEMPLATE {quote_ident(database_template)}"
        )
        try:
            yield _with_database(base_url, name)
        finally:
            # FORCE: a test that leaked a connection or pool must not leak the database too
            await drop_database(admin, name)
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def mqtt_settings(stack_env: Mapping[str, str]) -> MqttSettings:
    """Mosquitto address, service accounts and credential files of the stack."""
    url = urlsplit(stack_env["CITYOPS_MQTT_URL"])
    device_file = Path(stack_env["CITYOPS_MQTT_DEVICE_PASSWORD_FILE"])
    return MqttSettings(
        host=url.hostname or "127.0.0.1",
        port=url.port or 1883,
        ingest_username=stack_env["CITYOPS_INGEST_MQTT_USERNAME"],
        ingest_password=stack_env["CITYOPS_INGEST_MQTT_PASSWORD"],
        gateway_username=stack_env["CITYOPS_SIMULATOR_MQTT_USERNAME"],
        gateway_password=stack_env["CITYOPS_SIMULATOR_MQTT_PASSWORD"],
        device_password_file=device_file,
        lock_file=Path(
            stack_env.get("CITYOPS_MQTT_PASSWORD_LOCK_FILE") or device_file.with_name("passwd.lock")
        ),
    )


def edit_devices(mqtt: MqttSettings, *, add: Mapping[str, str], remove: set[str]) -> None:
    """Change devices.passwd the way the API does (file lock, atomic write); no signal."""
    files = BrokerFiles(device_file=mqtt.device_password_file, lock_file=mqtt.lock_file)
    apply_to_files(files, {**dict.fromkeys(remove), **add})


@pytest_asyncio.fixture
async def provision_mqtt_device(mqtt_settings: MqttSettings) -> AsyncIterator[ProvisionDevice]:
    """Factory: give `device_id` MQTT credentials; returns its password once it can CONNECT."""
    provisioned: set[str] = set()

    async def provision(device_id: str) -> str:
        password = secrets.token_urlsafe(16)
        hashed = mqtt_auth.hash_password(password)
        await asyncio.to_thread(edit_devices, mqtt_settings, add={device_id: hashed}, remove=set())
        provisioned.add(device_id)

        async def can_connect() -> bool:
            reason = await asyncio.to_thread(
                mqtt_connect_reason,
                mqtt_settings.host,
                mqtt_settings.port,
                username=device_id,
                password=password,
            )
            return reason is None

        # the broker's auth plugin stats the file before refusing a login: live at once
        await wait_for(can_connect, timeout=10, interval=0.1, message=f"{device_id} can CONNECT")
        return password

    try:
        yield provision
    finally:
        if provisioned:
            await asyncio.to_thread(edit_devices, mqtt_settings, add={}, remove=provisioned)


@pytest.fixture
def own_broker() -> Iterator[BrokerInstance]:
    """A started broker of this test's own, removed afterwards (see broker_support.py)."""
    from tests.integration.broker_support import own_broker_running

    with own_broker_running() as broker:
        yield broker


@pytest_asyncio.fixture
async def case(
    stack_env: Mapping[str, str],
    kafka_topics: MakeTopics,
    database_url: str,
    mqtt_settings: MqttSettings,
) -> AsyncIterator[IngestCase]:
    """An ingest test case: its own topics, database and share group; cleaned up afterwards."""
    from tests.integration.ingest_support import ingest_case

    async with ingest_case(
        stack_env=stack_env,
        kafka_topics=kafka_topics,
        database_url=database_url,
        mqtt=mqtt_settings,
    ) as made:
        yield made


@pytest_asyncio.fixture
async def api_case(database_url: str, kafka: StackKafka, kafka_topics: MakeTopics) -> ApiCase:
    """A fresh database and the API's topics; `api_case.settings(**overrides)` for the app."""
    from tests.integration.api_support import BASE_TOPICS, ApiCase

    return ApiCase(database_url, kafka, await kafka_topics(*BASE_TOPICS))
