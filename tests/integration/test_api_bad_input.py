"""Every class of bad input of issue 12 row 5 gets a 4xx problem from the real API, never a 500.

One API (real PostgreSQL and Kafka) serves every case of the module; each class of input is a
test of its own. Bodies are raw bytes, so they carry exactly what an attacker would send:
integers beyond 64 bits, `NaN`, lone surrogates (`\\ud800`), NUL (`\\u0000`, `%00`).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from cityops.api.http.params import encode_cursor
from tests.integration.api_support import ApiCase, RunningApi, open_ticket, run_api

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

JSON = {"content-type": "application/json"}
NDJSON = {"content-type": "application/x-ndjson"}
CSV = {"content-type": "text/csv"}


@dataclass(frozen=True)
class Served:
    """The module's running API, its ticket and an HTTP client."""

    api: RunningApi
    http: httpx.AsyncClient
    ticket_id: int


@pytest_asyncio.fixture
async def served(api_case: ApiCase) -> AsyncIterator[Served]:
    """The API over a fresh database with device `wb-bad` and one open ticket on it."""
    conn = await asyncpg.connect(api_case.database_url)
    await conn.execute(
        "INSERT INTO devices (device_id, kind, district) VALUES ('wb-bad', 'wastebin', 'north')"
    )
    await conn.close()
    ticket_id = await open_ticket(api_case.database_url, device_id="wb-bad")
    async with run_api(api_case.settings()) as api, api.client() as http:
        yield Served(api, http, ticket_id)


def raw_cursor(json_text: bytes) -> str:
    """A cursor made of arbitrary JSON (as an attacker would forge one)."""
    return base64.urlsafe_b64encode(json_text).decode().rstrip("=")


@dataclass
class Checks:
    """Requests that must each get a 4xx problem+json saying what was wrong; every one that
    does not is collected, so a test names all the cases of its class that fail."""

    http: httpx.AsyncClient
    failures: list[str] = field(default_factory=list)

    async def problem(self, method: str, url: str, **kwargs: Any) -> None:
        """Send the request; note it unless the answer is a 4xx problem with a detail."""
        response = await self.http.request(method, url, **kwargs)
        problem = response.headers.get("content-type", "").startswith("application/problem+json")
        if not (400 <= response.status_code < 500 and problem and response.json()["detail"]):
            sent = kwargs.get("content") or kwargs.get("params") or ""
            self.failures.append(f"{method} {url} {sent!r} -> {response.status_code}")

    def verdict(self) -> None:
        """Fail with every case that did not get its 4xx."""
        assert not self.failures, "\n".join(self.failures)


def device_body(metadata_json: bytes = b"{}", **fields: bytes) -> bytes:
    """A device create body with raw JSON for metadata and other fields."""
    extra = b"".join(b', "%s": %s' % (name.encode(), value) for name, value in fields.items())
    device_id = f"wb-{uuid.uuid4().hex[:8]}".encode()
    return b'{"device_id": "%s", "kind": "wastebin", "metadata": %s%s}' % (
        device_id,
        metadata_json,
        extra,
    )


BIG_NUMBERS = [
    b'{"n": 18446744073709551616}',
    b'{"n": 9223372036854775808}',
    b'{"n": -9223372036854775809}',
    b'{"deep": [{"n": 100000000000000000000000000000}]}',
    b'{"x": NaN}',
    b'{"x": Infinity}',
    b'{"x": 1e400}',
]


async def test_numbers_beyond_int64_or_float64_in_metadata_are_refused(served: Served) -> None:
    checks = Checks(served.http)
    for metadata in BIG_NUMBERS:
        await checks.problem("POST", "/v1/devices", content=device_body(metadata), headers=JSON)
        patch = b'{"metadata": %s}' % metadata
        await checks.problem("PATCH", "/v1/devices/wb-bad", content=patch, headers=JSON)
    checks.verdict()


BAD_TEXT = [rb'"\ud800"', rb'"a\udfffb"', rb'"a\u0000b"']


async def test_lone_surrogates_and_nul_in_body_strings_are_refused(served: Served) -> None:
    checks = Checks(served.http)
    transitions = f"/v1/tickets/{served.ticket_id}/transitions"
    for text in BAD_TEXT:
        for metadata in (b'{"k": %s}' % text, b"{%s: 1}" % text, b'{"k": [{"k": %s}]}' % text):
            create = device_body(metadata)
            await checks.problem("POST", "/v1/devices", content=create, headers=JSON)
            patch = b'{"metadata": %s}' % metadata
            await checks.problem("PATCH", "/v1/devices/wb-bad", content=patch, headers=JSON)
        for name in ("district", "zone"):
            create = device_body(**{name: text})
            await checks.problem("POST", "/v1/devices", content=create, headers=JSON)
            patch = b'{"%s": %s}' % (name.encode(), text)
            await checks.problem("PATCH", "/v1/devices/wb-bad", content=patch, headers=JSON)
        for operator_field in (b"note", b"assignee", b"resolution"):
            body = b'{"to": "acknowledged", "version": 1, "%s": %s}' % (operator_field, text)
            await checks.problem("POST", transitions, content=body, headers=JSON)
    checks.verdict()


NUL_URLS = [
    "/v1/devices/wb%00bad",
    "/v1/devices/wb%00bad/readings",
    "/v1/devices/wb-bad/readings?field=fill%00pct",
    "/v1/devices?district=north%00",
    "/v1/devices?bbox=1,2,3,4%00",
    "/v1/tickets?department=sani%00tation",
    "/v1/tickets?device_id=wb%00bad",
    "/v1/tickets?cursor=%00",
    "/v1/districts/north%00/summary",
    "/v1/api-keys/key%00name",
]


async def test_nul_in_paths_and_query_parameters_is_refused(served: Served) -> None:
    checks = Checks(served.http)
    for url in NUL_URLS:
        await checks.problem("DELETE" if url.startswith("/v1/api-keys") else "GET", url)
    checks.verdict()


CURSORS = [
    ("/v1/tickets", raw_cursor(b'{"a": 9223372036854775808}')),
    ("/v1/tickets", raw_cursor(b'{"a": -9223372036854775809}')),
    ("/v1/tickets", raw_cursor(b'{"a": 18446744073709551616}')),
    ("/v1/devices", raw_cursor(b'{"a": "wb\\u0000"}')),
    ("/v1/devices", raw_cursor(b'{"a": "wb\\ud800"}')),
    ("/v1/devices", raw_cursor(b'{"a": "wb\x00"}')),
    ("/v1/devices", encode_cursor("x" * 300)),
]


async def test_forged_cursors_are_refused(served: Served) -> None:
    checks = Checks(served.http)
    for path, cursor in CURSORS:
        await checks.problem("GET", path, params={"cursor": cursor})
    checks.verdict()


READING_WINDOWS = [
    {"from": "0001-01-01T00:00:00+14:00"},
    {"to": "0001-01-01T00:00:00Z"},
    {"from": "0001-01-01T00:00:00Z", "to": "0001-01-02T00:00:00Z"},
    {"to": "9999-12-31T23:59:59-14:00"},
    {"from": "9999-12-31T00:00:00Z", "to": "9999-12-31T23:59:59Z"},
    {
        "from": "9999-12-30T00:00:00Z",
        "to": "9999-12-31T00:00:00Z",
        "field": "fill_pct",
        "bucket": "1h",
    },
    {
        "from": "0001-01-01T00:00:00Z",
        "to": "0001-01-02T00:00:00Z",
        "field": "fill_pct",
        "bucket": "1h",
    },
]


async def test_readings_windows_near_year_1_or_9999_are_refused(served: Served) -> None:
    checks = Checks(served.http)
    for params in READING_WINDOWS:
        await checks.problem("GET", "/v1/devices/wb-bad/readings", params=params)
    checks.verdict()


def jsonl_row(fields: bytes) -> bytes:
    """One JSON-lines import row of a new wastebin with raw JSON `fields`."""
    return b'{"device_id": "wb-import", "kind": "wastebin", %s}\n' % fields


def csv_rows(column: str, value: bytes) -> bytes:
    """A CSV import of one new wastebin with a raw `value` in `column`."""
    return b"device_id,kind,%s\nwb-import,wastebin,%s\n" % (column.encode(), value)


IMPORT_ROWS = [
    (NDJSON, jsonl_row(b'"metadata": {"n": 18446744073709551616}')),
    (NDJSON, jsonl_row(b'"metadata": {"n": -9223372036854775809}')),
    (NDJSON, jsonl_row(b'"metadata": {"k": "a\\u0000b"}')),
    (NDJSON, jsonl_row(b'"district": "a\\u0000b"')),
    (NDJSON, jsonl_row(b'"zone": "\\ud800"')),
    (NDJSON, b'{"device_id": "wb-\\ud800\\u0000", "kind": "wastebin"}\n'),
    (CSV, csv_rows("metadata", b'"{""n"": 18446744073709551616}"')),
    (CSV, csv_rows("metadata", b'"{""n"": 1e400}"')),
    (CSV, csv_rows("metadata", b'"{""k"": ""a\\u0000b""}"')),
    (CSV, csv_rows("district", b"a\x00b")),
]


async def test_imports_refuse_the_row_never_a_float_or_a_500(served: Served) -> None:
    failures = []
    for headers, body in IMPORT_ROWS:
        response = await served.http.post("/v1/devices:import", content=body, headers=headers)
        result = response.json() if response.status_code == 200 else {}
        refused = (result.get("created"), result.get("failed")) == (0, 1)
        if not (refused and result["errors"][0]["errors"][0]["message"]):
            failures.append(f"{body!r} -> {response.status_code} {response.text[:200]}")
    assert not failures, "\n".join(failures)
    devices = (await served.http.get("/v1/devices")).json()["items"]
    assert [d["device_id"] for d in devices] == ["wb-bad"]
