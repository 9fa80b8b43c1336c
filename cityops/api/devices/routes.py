"""`/v1/devices`: registry with live state, provisioning with MQTT credentials, readings."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
import orjson
from fastapi import APIRouter, Query, Request, Response

from cityops.api.context import Admin, Context, Reader
from cityops.api.devices import readings as store_readings
from cityops.api.devices import store as store_devices
from cityops.api.devices.credentials import (
    ParsedImport,
    RowError,
    new_password,
    parse_import,
    row_error,
    row_errors_json,
)
from cityops.api.devices.models import (
    MEASURE_FIELDS,
    DeviceCreate,
    DeviceDetail,
    DeviceOut,
    DevicePage,
    DevicePatch,
    DeviceProvisioned,
    ImportResult,
    MqttCredentials,
    ReadingsOut,
)
from cityops.api.http.fields import District, Instant
from cityops.api.http.params import (
    ParamError,
    check_bucket_count,
    decode_cursor,
    encode_cursor,
    parse_bbox,
    parse_bucket,
    resolve_window,
)
from cityops.api.http.problems import Problem
from cityops.api.http.responses import json_response
from cityops.common.kinds import Kind
from cityops.common.topics import status_topic, telemetry_topic

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["devices"])

_CSV_TYPES = {"text/csv", "application/csv"}
_JSONL_TYPES = {
    "application/x-ndjson",
    "application/jsonl",
    "application/json-lines",
    "application/x-jsonlines",
}


def param_problem(exc: ParamError) -> Problem:
    """A 422 problem naming the query parameter."""
    return Problem(
        422,
        str(exc),
        problem="validation",
        errors=[{"field": f"query.{exc.param}", "message": exc.message}],
    )


def device_out(row: Any) -> dict[str, Any]:
    """A device row (with state and connectivity columns) as the public document."""
    state = None
    if row["state_seq"] is not None:
        state = {
            "seq": row["state_seq"],
            "ts": row["state_ts"],
            "received_at": row["state_received_at"],
            "values": orjson.loads(row["state_values"]),
        }
    connectivity = None
    if row["online"] is not None:
        connectivity = {
            "online": row["online"],
            "last_seen_at": row["last_seen_at"],
            "changed_at": row["changed_at"],
        }
    return {
        "device_id": row["device_id"],
        "kind": row["kind"],
        "district": row["district"],
        "zone": row["zone"],
        "lat": row["lat"],
        "lon": row["lon"],
        "reporting_interval_s": row["reporting_interval_s"],
        "metadata": orjson.loads(row["metadata"]),
        "enabled": row["enabled"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "state": state,
        "connectivity": connectivity,
    }


async def _device_or_404(context: Context, device_id: str) -> Any:
    row = await store_devices.get_device(context.pool, device_id=device_id)
    if row is None:
        raise Problem(404, f"no device {device_id!r}", problem="device-not-found")
    return row


@router.get("/devices", response_model=DevicePage, summary="List devices")
async def list_devices(
    *,
    context: Context,
    _: Reader,
    kind: Kind | None = None,
    district: District | None = None,
    status: Annotated[
        Literal["online", "offline", "never_seen"] | None,
        Query(description="Connectivity: online, offline, or never_seen."),
    ] = None,
    bbox: Annotated[
        str | None,
        Query(max_length=200, description="min_lon,min_lat,max_lon,max_lat (degrees)"),
    ] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """Devices in id order with their latest state; follow `next_cursor` for more."""
    try:
        box = parse_bbox(bbox) if bbox is not None else None
        after = decode_cursor(cursor, kind=str) if cursor is not None else None
    except ParamError as exc:
        raise param_problem(exc) from exc
    rows = await store_devices.list_devices(
        context.pool,
        kind=kind.value if kind else None,
        district=district,
        status=status,
        bbox=box,
        after=str(after) if after is not None else None,
        limit=limit,
    )
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1]["device_id"]) if len(rows) > limit else None
    return json_response({"items": [device_out(row) for row in page], "next_cursor": next_cursor})


@router.get("/devices/{device_id}", response_model=DeviceDetail, summary="Get a device")
async def get_device(context: Context, _: Reader, device_id: str) -> Response:
    """Registry, latest state, connectivity and open tickets of one device."""
    row = await _device_or_404(context, device_id)
    document = device_out(row)
    document["open_tickets"] = orjson.loads(row["open_tickets"])
    return json_response(document)


@router.post(
    "/devices",
    response_model=DeviceProvisioned,
    status_code=201,
    summary="Provision a device",
    responses={409: {"description": "The device id is taken"}},
)
async def create_device(
    context: Context, principal: Admin, body: DeviceCreate, response: Response
) -> dict[str, Any]:
    """Create a device and its MQTT credentials; the password is returned only here."""
    password = new_password()
    (password_hash,) = await context.credentials.hash_passwords([password])
    async with context.pool.acquire() as conn, conn.transaction():
        created = await store_devices.insert_devices(conn, devices=[body.model_dump()])
        if not created:
            raise Problem(409, f"device {body.device_id!r} already exists", problem="exists")
        await store_devices.insert_credentials(
            conn, device_ids=created, password_hashes=[password_hash]
        )
        if body.enabled:
            await context.credentials.apply(conn, {body.device_id: password_hash})
        await context.publisher.devices_changed(conn, device_ids=created)
    context.publisher.committed()
    context.metrics.provisioned.inc()
    log.info(
        "device provisioned",
        extra={"device_id": body.device_id, "kind": body.kind.value, "actor": principal.actor},
    )
    row = await _device_or_404(context, body.device_id)
    response.headers["Location"] = f"/v1/devices/{body.device_id}"
    return {
        "device": device_out(row),
        "mqtt": MqttCredentials(
            username=body.device_id,
            password=password,
            telemetry_topic=telemetry_topic(body.kind, body.device_id),
            status_topic=status_topic(body.kind, body.device_id),
        ),
    }


async def _read_import(context: Context, request: Request) -> ParsedImport:
    """The import body, size-limited, then parsed by its content type in a worker thread.

    Decoding and validating up to 100k rows is seconds of CPU: on the event loop it stalled
    every other request (/healthz took 11 s during a 100k-row import; issue 12 row 8).
    """
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media in _CSV_TYPES:
        fmt = "csv"
    elif media in _JSONL_TYPES:
        fmt = "jsonl"
    else:
        raise Problem(
            415, "send text/csv or application/x-ndjson", problem="unsupported-media-type"
        )
    limit = context.settings.api_import_max_bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(
                413, f"the import is larger than {limit} bytes", problem="content-too-large"
            )
        chunks.append(chunk)
    return await asyncio.to_thread(
        _parse_import_body, chunks, fmt=fmt, max_rows=context.settings.api_import_max_rows
    )


def _parse_import_body(chunks: list[bytes], *, fmt: str, max_rows: int) -> ParsedImport:
    """Decode and parse an import (runs in a worker thread)."""
    try:
        text = b"".join(chunks).decode("utf-8-sig")
        return parse_import(text, fmt=fmt, max_rows=max_rows)
    except UnicodeDecodeError as exc:
        raise Problem(400, "the import is not UTF-8 text", problem="bad-encoding") from exc
    except ValueError as exc:
        raise Problem(400, str(exc), problem="bad-import") from exc


def _import_document(
    *,
    created: list[str],
    updated: list[str],
    errors: list[RowError],
    passwords: dict[str, str],
) -> bytes:
    """The ImportResult document as JSON (runs in a worker thread: 100k errors are CPU)."""
    errors.sort(key=lambda e: e[0])
    return orjson.dumps(
        {
            "created": len(created),
            "updated": len(updated),
            "failed": len(errors),
            "errors": orjson.Fragment(row_errors_json(errors)),
            "credentials": [
                {"device_id": i, "username": i, "password": passwords[i]} for i in created
            ],
        }
    )


@router.post(
    "/devices:import",
    response_model=ImportResult,
    summary="Import devices (CSV or JSON lines)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
)
async def import_devices(context: Context, principal: Admin, request: Request) -> Response:
    """Create or update many devices; bad rows are reported and the valid rows kept.

    New devices get MQTT credentials (returned once, in `credentials`); existing devices of
    the same kind are updated and keep theirs.
    """
    parsed = await _read_import(context, request)
    errors = list(parsed.errors)
    async with context.pool.acquire() as conn:
        ids = [d.device_id for d in parsed.devices]
        existing = await store_devices.existing_kinds(conn, device_ids=ids)
        fresh, again = [], []
        for device, row_number in zip(parsed.devices, parsed.rows, strict=True):
            known = existing.get(device.device_id)
            if known is None:
                fresh.append(device)
            elif known == device.kind.value:
                again.append(device)
            else:
                message = {"field": "kind", "message": f"the device exists as {known}"}
                errors.append(row_error(row_number, device.device_id, [message]))
        # per-row work off the event loop too: 100k passwords and row dicts are ~1 s of CPU
        passwords, fresh_rows, again_rows = await asyncio.to_thread(
            lambda: (
                [new_password() for _ in fresh],
                [d.model_dump() for d in fresh],
                [d.model_dump() for d in again],
            )
        )
        hashes = await context.credentials.hash_passwords(passwords)
        by_id = {d.device_id: (p, h) for d, p, h in zip(fresh, passwords, hashes, strict=True)}
        async with conn.transaction():
            created = await store_devices.insert_devices(conn, devices=fresh_rows)
            raced = {d.device_id for d in fresh} - set(created)
            await store_devices.insert_credentials(
                conn, device_ids=created, password_hashes=[by_id[i][1] for i in created]
            )
            updated = await store_devices.update_devices(conn, devices=again_rows)
            states = await store_devices.credential_states(conn, device_ids=created + updated)
            await context.credentials.apply(conn, states)
            await context.publisher.devices_changed(conn, device_ids=created + updated)
    context.publisher.committed()
    raced_message = {"field": "device_id", "message": "created concurrently; retry the row"}
    errors.extend(
        row_error(row_number, device.device_id, [raced_message])
        for device, row_number in zip(parsed.devices, parsed.rows, strict=True)
        if device.device_id in raced
    )
    context.metrics.provisioned.inc(len(created))
    log.info(
        "devices imported",
        extra={
            "devices_created": len(created),
            "devices_updated": len(updated),
            "rows_failed": len(errors),
            "actor": principal.actor,
        },
    )
    document = await asyncio.to_thread(
        _import_document,
        created=created,
        updated=updated,
        errors=errors,
        passwords={i: by_id[i][0] for i in created},
    )
    return Response(document, media_type="application/json")


@router.patch("/devices/{device_id}", response_model=DeviceOut, summary="Change a device")
async def patch_device(
    context: Context, principal: Admin, device_id: str, body: DevicePatch
) -> dict[str, Any]:
    """Change registry fields; `enabled: false` revokes the MQTT credentials, true restores."""
    changes = body.model_dump(exclude_unset=True)
    for column in ("district", "reporting_interval_s", "metadata", "enabled"):
        if column in changes and changes[column] is None:
            raise Problem(
                422,
                f"{column} cannot be null",
                problem="validation",
                errors=[{"field": f"body.{column}", "message": "cannot be null"}],
            )
    if changes:
        try:
            async with context.pool.acquire() as conn, conn.transaction():
                found = await store_devices.patch_device(conn, device_id=device_id, changes=changes)
                if found and "enabled" in changes:
                    await store_devices.set_credentials_revoked(
                        conn, device_id=device_id, revoked=not changes["enabled"]
                    )
                    states = await store_devices.credential_states(conn, device_ids=[device_id])
                    await context.credentials.apply(conn, states)
                if found:
                    await context.publisher.devices_changed(conn, device_ids=[device_id])
        except asyncpg.CheckViolationError as exc:
            raise Problem(
                422, "lat and lon must both be set or both be null", problem="validation"
            ) from exc
        if not found:
            raise Problem(404, f"no device {device_id!r}", problem="device-not-found")
        context.publisher.committed()
        log.info(
            "device changed",
            extra={"device_id": device_id, "fields": sorted(changes), "actor": principal.actor},
        )
    return device_out(await _device_or_404(context, device_id))


@router.delete("/devices/{device_id}", status_code=204, summary="Delete a device")
async def delete_device(context: Context, principal: Admin, device_id: str) -> Response:
    """Remove a device from the registry and revoke its MQTT credentials."""
    async with context.pool.acquire() as conn, conn.transaction():
        kind = await store_devices.delete_device(conn, device_id=device_id)
        if kind is None:
            raise Problem(404, f"no device {device_id!r}", problem="device-not-found")
        await context.credentials.apply(conn, {device_id: None})
        await context.publisher.device_deleted(conn, device_id=device_id)
    context.publisher.committed()
    context.metrics.revoked.inc()
    log.info("device deleted", extra={"device_id": device_id, "actor": principal.actor})
    return Response(status_code=204)


def readings_query(
    *,
    kind: Kind,
    start: datetime | None,
    end: datetime | None,
    field: str | None,
    bucket: str | None,
) -> tuple[datetime, datetime, timedelta | None]:
    """Validate a readings query: its window and bucket width (ParamError names the param)."""
    window_start, window_end = resolve_window(start=start, end=end, now=datetime.now(UTC))
    if field is not None and field not in MEASURE_FIELDS[kind]:
        allowed = ", ".join(sorted(MEASURE_FIELDS[kind]))
        raise ParamError("field", f"not a measured field of a {kind}; one of {allowed}")
    width = parse_bucket(bucket) if bucket is not None else None
    if width is not None:
        if field is None:
            raise ParamError("field", "required with bucket")
        check_bucket_count(start=window_start, end=window_end, bucket=width)
    return window_start, window_end, width


@router.get("/devices/{device_id}/readings", response_model=ReadingsOut, summary="Readings history")
async def get_readings(
    *,
    context: Context,
    _: Reader,
    device_id: str,
    start: Annotated[
        Instant | None, Query(alias="from", description="RFC 3339; default to - 24 h")
    ] = None,
    end: Annotated[Instant | None, Query(alias="to", description="RFC 3339; default now")] = None,
    field: Annotated[str | None, Query(max_length=64, description="One measured field")] = None,
    bucket: Annotated[
        str | None, Query(max_length=16, description="Aggregate per bucket: 30s, 15m, 1h, 1d")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> Response:
    """Raw readings (newest first, up to `limit`) or, with `bucket` and `field`, aggregates."""
    kind = await store_readings.device_kind(context.pool, device_id=device_id)
    if kind is None:
        raise Problem(404, f"no device {device_id!r}", problem="device-not-found")
    try:
        window_start, window_end, width = readings_query(
            kind=Kind(kind), start=start, end=end, field=field, bucket=bucket
        )
    except ParamError as exc:
        raise param_problem(exc) from exc
    document: dict[str, Any] = {
        "device_id": device_id,
        "start": window_start,
        "end": window_end,
        "field": field,
        "bucket_s": int(width.total_seconds()) if width is not None else None,
        "points": None,
        "buckets": None,
    }
    if width is not None and field is not None:
        rows = await store_readings.bucketed(
            context.pool,
            device_id=device_id,
            start=window_start,
            end=window_end,
            field=field,
            bucket=width,
        )
        document["buckets"] = [dict(row) for row in rows]
    else:
        rows = await store_readings.raw(
            context.pool,
            device_id=device_id,
            start=window_start,
            end=window_end,
            field=field,
            limit=limit,
        )
        document["points"] = [
            {
                "seq": row["seq"],
                "ts": row["ts"],
                "received_at": row["received_at"],
                "values": orjson.loads(row["reading"]),
            }
            for row in rows
        ]
    return json_response(document)
