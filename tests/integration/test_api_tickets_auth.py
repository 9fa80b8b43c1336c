"""Scopes (401 vs 403), ticket transitions by the A7 state machine, stale versions get 409."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from cityops.common.kafka import kafka_consumer
from cityops.common.tickets import TicketEvent
from tests.integration.api_support import ApiCase, open_ticket, run_api

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


async def test_scopes_401_and_403(api_case: ApiCase) -> None:
    settings = api_case.settings(
        api_projector_enabled=False,
    )
    async with run_api(settings) as api, api.client() as admin, api.client(None) as anonymous:
        response = await anonymous.get("/v1/devices")
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.json()["status"] == 401
        assert (await anonymous.get("/healthz")).status_code == 200
        bogus = await anonymous.get("/v1/devices", headers={"Authorization": "Bearer nope"})
        assert bogus.status_code == 401
        basic = await anonymous.get("/v1/devices", headers={"Authorization": "Basic eDp5"})
        assert basic.status_code == 401

        keys = {}
        for name, scopes in (("reader", ["read"]), ("operator", ["operate"])):
            response = await admin.post("/v1/api-keys", json={"name": name, "scopes": scopes})
            assert response.status_code == 201, response.text
            keys[name] = response.json()["key"]
        assert (
            await admin.post("/v1/api-keys", json={"name": "reader", "scopes": ["read"]})
        ).status_code == 409

        async with api.client(keys["reader"]) as reader, api.client(keys["operator"]) as operator:
            assert (await reader.get("/v1/devices")).status_code == 200
            forbidden = await reader.post(
                "/v1/devices", json={"device_id": "x-1", "kind": "parking"}
            )
            assert forbidden.status_code == 403
            assert forbidden.json()["required_scope"] == "admin"
            transition = await reader.post(
                "/v1/tickets/1/transitions", json={"to": "acknowledged", "version": 1}
            )
            assert transition.status_code == 403
            # operate includes read, not admin
            assert (await operator.get("/v1/tickets")).status_code == 200
            assert (await operator.get("/v1/api-keys")).status_code == 403
            missing = await operator.post(
                "/v1/tickets/999999/transitions", json={"to": "acknowledged", "version": 1}
            )
            assert missing.status_code == 404

            listed = (await admin.get("/v1/api-keys")).json()["items"]
            assert {k["name"] for k in listed} == {"reader", "operator"}
            assert all("key" not in k for k in listed)
            assert (await admin.delete("/v1/api-keys/reader")).status_code == 204
            assert (await reader.get("/v1/devices")).status_code == 401


async def test_ticket_transitions_follow_state_machine(
    api_case: ApiCase, database_url: str
) -> None:
    topics = api_case.topics
    settings = api_case.settings(
        api_projector_enabled=False,
    )
    device_id = f"wb-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    ticket_id = await open_ticket(
        database_url,
        device_id=device_id,
        district="d9",
        opened_at=now - timedelta(hours=5),
        due_at=now - timedelta(hours=1),  # overdue
    )
    async with run_api(settings) as api, api.client() as admin:
        key = (
            await admin.post("/v1/api-keys", json={"name": "alice", "scopes": ["operate"]})
        ).json()["key"]
        async with api.client(key) as http:
            ticket = (await http.get(f"/v1/tickets/{ticket_id}")).json()
            assert ticket["status"] == "open"
            assert ticket["version"] == 1
            assert ticket["overdue"] is True
            overdue = (await http.get("/v1/tickets", params={"overdue": "true"})).json()["items"]
            assert [t["id"] for t in overdue] == [ticket_id]

            url = f"/v1/tickets/{ticket_id}/transitions"
            response = await http.post(
                url, json={"to": "acknowledged", "version": 1, "assignee": "crew-7"}
            )
            assert response.status_code == 200, response.text
            assert response.json()["version"] == 2
            assert response.json()["acknowledged_at"] is not None

            stale = await http.post(url, json={"to": "in_progress", "version": 1})
            assert stale.status_code == 409
            assert stale.json()["current_version"] == 2
            assert stale.json()["type"].endswith("/stale-version")

            invalid = await http.post(url, json={"to": "closed", "version": 2})
            assert invalid.status_code == 409
            assert invalid.json()["type"].endswith("/invalid-transition")

            bad = await http.post(url, json={"to": "sideways", "version": 2})
            assert bad.status_code == 422
            assert bad.json()["errors"][0]["field"] == "body.to"

            for target, version in (("in_progress", 2), ("resolved", 3), ("closed", 4)):
                response = await http.post(url, json={"to": target, "version": version})
                assert response.status_code == 200, response.text
            detail = (await http.get(f"/v1/tickets/{ticket_id}")).json()
            assert detail["status"] == "closed"
            assert detail["resolution"] == "manual"
            assert [(t["action"], t["actor"]) for t in detail["transitions"]] == [
                ("opened", "rules"),
                ("acknowledged", "apikey:alice"),
                ("in_progress", "apikey:alice"),
                ("resolved", "apikey:alice"),
                ("closed", "apikey:alice"),
            ]
            final = await http.post(url, json={"to": "open", "version": 5})
            assert final.status_code == 409

    # Every operator transition is on city.tickets.v1, after the commit.
    consumer = kafka_consumer(
        api_case.kafka.admin, topics["city.tickets.v1"], auto_offset_reset="earliest"
    )
    await consumer.start()
    events: list[TicketEvent] = []
    try:
        while len(events) < 4:
            fetched = await asyncio.wait_for(consumer.getmany(timeout_ms=500), 10)
            events += [
                TicketEvent.model_validate(orjson.loads(r.value))
                for batch in fetched.values()
                for r in batch
            ]
    finally:
        await consumer.stop()
    assert [(e.status, e.version, e.actor) for e in events] == [
        ("acknowledged", 2, "apikey:alice"),
        ("in_progress", 3, "apikey:alice"),
        ("resolved", 4, "apikey:alice"),
        ("closed", 5, "apikey:alice"),
    ]


async def test_oversized_bodies_are_413_problems(api_case: ApiCase) -> None:
    settings = api_case.settings(
        api_projector_enabled=False,
        api_import_max_bytes=100_000,
    )
    async with run_api(settings) as api, api.client() as http:
        huge = {"device_id": "wb-big", "kind": "wastebin", "metadata": {"x": "y" * 100_000}}
        response = await http.post("/v1/devices", json=huge)
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            yield b'{"device_id": "wb-big", "kind": "wastebin", "metadata": {"x": "'
            for _ in range(20):
                yield b"y" * 5000
            yield b'"}}'

        streamed = await http.post(
            "/v1/devices", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert streamed.status_code == 413
        assert streamed.json()["type"].endswith("/content-too-large")
        # Imports may be bigger than a JSON body, up to their own setting.
        rows = "device_id,kind\n" + "".join(f"imp-{n:06d},parking\n" for n in range(5000))
        assert 64 * 1024 < len(rows) < 100_000
        ok = await http.post(
            "/v1/devices:import", content=rows, headers={"Content-Type": "text/csv"}
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["created"] == 5000
        too_big = rows + "".join(f"imp-{n:06d},parking\n" for n in range(5000, 9000))
        refused = await http.post(
            "/v1/devices:import", content=too_big, headers={"Content-Type": "text/csv"}
        )
        assert refused.status_code == 413
