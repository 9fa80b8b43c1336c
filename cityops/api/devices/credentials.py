"""Device provisioning: registry rows plus per-device MQTT credentials in Mosquitto.

The password is generated here, returned once and stored only as Mosquitto's `$7$` PBKDF2
hash in `device_credentials`. The broker's devices file is updated from the database under
a PostgreSQL advisory lock (held until the provisioning transaction commits, so replicas
apply changes in commit order) and a file lock (other tools on the same host) and written
atomically; the broker's auth plugin notices the new file within 0.2 s by itself (no signal,
no reload) and drops the connections of revoked devices.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from cityops.api.db import Conn
from cityops.api.devices.models import DeviceCreate
from cityops.api.http.fields import loads_exact, text_problem
from cityops.api.http.problems import field_errors
from cityops.api.metrics import ApiMetrics
from cityops.common import mqtt_auth

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key serialising broker credential writes across API replicas.
CREDENTIALS_LOCK = 0x63697479_0A02
_CSV_FIELDS = frozenset(DeviceCreate.model_fields)


def new_password() -> str:
    """A random MQTT password (192 bits)."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """Where the broker's device credentials live on this host."""

    device_file: Path
    lock_file: Path

    @classmethod
    def from_settings(
        cls, *, device_file: Path | None, lock_file: Path | None = None
    ) -> BrokerFiles | None:
        """None when no devices file is configured (credentials then live only in the DB)."""
        if device_file is None:
            return None
        return cls(
            device_file=device_file, lock_file=lock_file or device_file.with_name("passwd.lock")
        )


def apply_to_files(files: BrokerFiles, changes: Mapping[str, str | None]) -> bool:
    """Set (hash) or remove (None) device entries; returns whether the file changed."""
    with mqtt_auth.password_files_lock(files.lock_file):
        text = files.device_file.read_text(encoding="utf-8") if files.device_file.exists() else ""
        current = mqtt_auth.parse_password_file(text)
        for device_id, password_hash in changes.items():
            if password_hash is None:
                current.pop(device_id, None)
            else:
                current[device_id] = password_hash
        rendered = mqtt_auth.render_password_file(current.items())
        if rendered == text:
            return False
        mqtt_auth.write_file_atomic(files.device_file, rendered)
        return True


class CredentialStore:
    """Applies credential changes to the broker inside the caller's transaction."""

    def __init__(
        self,
        *,
        files: BrokerFiles | None,
        metrics: ApiMetrics,
        iterations: int,
    ) -> None:
        self.files = files
        self._metrics = metrics
        self._iterations = iterations

    async def hash_passwords(self, passwords: list[str]) -> list[str]:
        """Mosquitto hashes of `passwords`, computed off the event loop."""
        iterations = self._iterations

        def run() -> list[str]:
            return [mqtt_auth.hash_password(p, iterations=iterations) for p in passwords]

        return await asyncio.to_thread(run)

    async def apply(self, conn: Conn, changes: Mapping[str, str | None]) -> None:
        """Lock (until the caller commits), then write the broker's devices file."""
        if not changes:
            return
        if self.files is None:
            self._metrics.credential_syncs.labels("skipped").inc()
            return
        await conn.execute("SELECT pg_advisory_xact_lock($1)", CREDENTIALS_LOCK)
        try:
            changed = await asyncio.to_thread(apply_to_files, self.files, dict(changes))
        except OSError:
            self._metrics.credential_syncs.labels("error").inc()
            raise
        self._metrics.credential_syncs.labels("ok").inc()
        log.info(
            "broker credentials updated",
            extra={"changes": len(changes), "file_changed": changed},
        )

    async def reconcile(self, conn: Conn, states: Mapping[str, str | None]) -> None:
        """Make the broker agree with the database for every device it has credentials for."""
        async with conn.transaction():
            await self.apply(conn, states)


# One refused import row: (row number, device id or None, ((field, message), ...)). Plain
# tuples of strings on purpose: the garbage collector stops tracking them, so the 100k of a
# bad import cost no full-collection passes (as pydantic models they did, up to 66 ms each,
# holding the GIL the event loop needs while the import is parsed in a worker thread).
RowError = tuple[int, str | None, tuple[tuple[str, str], ...]]
_ECHOED_ID_MAX = 64


def row_error(row: int, device_id: Any, errors: Iterable[Mapping[str, str]]) -> RowError:
    """A refused row; the device id is echoed only when it is storable text (64 chars at most)."""
    echoed = None
    if isinstance(device_id, str) and text_problem(device_id) is None:
        echoed = device_id[:_ECHOED_ID_MAX]
    return (row, echoed, tuple((e["field"], e["message"]) for e in errors))


def row_errors_json(errors: Sequence[RowError], *, chunk: int = 1000) -> bytes:
    """The `errors` array of an ImportResult, rendered a chunk at a time (little garbage)."""
    parts = []
    for start in range(0, len(errors), chunk):
        documents = [
            {
                "row": row,
                "device_id": device_id,
                "errors": [{"field": f, "message": m} for f, m in field_messages],
            }
            for row, device_id, field_messages in errors[start : start + chunk]
        ]
        parts.append(orjson.dumps(documents)[1:-1])
    return b"[" + b",".join(parts) + b"]"


@dataclass(slots=True)
class ParsedImport:
    """Valid rows and per-row errors of an import file."""

    devices: list[DeviceCreate]
    rows: list[int]
    errors: list[RowError]


def _csv_value(column: str, text: str) -> Any:
    if text == "":
        return None
    if column == "metadata":
        return loads_exact(text)
    if column in {"lat", "lon"}:
        return float(text)
    if column == "reporting_interval_s":
        return int(text)
    if column == "enabled":
        lowered = text.strip().lower()
        if lowered in {"true", "1", "yes"}:
            return True
        if lowered in {"false", "0", "no"}:
            return False
        raise ValueError("enabled must be true or false")
    return text


def _csv_records(text: str, *, max_rows: int) -> Iterator[tuple[int, Any]]:
    """(row number, dict or the error) per CSV data row; csv.Error for a malformed file."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = set(reader.fieldnames or [])
    unknown = header - _CSV_FIELDS
    if not reader.fieldnames or "device_id" not in header or "kind" not in header:
        raise ValueError("the CSV needs a header row with at least device_id and kind")
    if unknown:
        raise ValueError(f"unknown CSV columns: {', '.join(sorted(unknown))}")
    for number, raw in enumerate(reader, start=1):
        if number > max_rows:
            raise ValueError(f"more than {max_rows} rows")
        if None in raw:
            yield number, ValueError("more values than header columns")
            continue
        try:
            values = {k: _csv_value(k, v or "") for k, v in raw.items()}
        except ValueError as exc:
            yield number, exc
        else:
            yield number, {k: v for k, v in values.items() if v is not None}


def _jsonl_records(text: str, *, max_rows: int) -> Iterator[tuple[int, Any]]:
    """(row number, parsed value or the error) per non-blank line."""
    number = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        number += 1
        if number > max_rows:
            raise ValueError(f"more than {max_rows} rows")
        try:
            yield number, loads_exact(line)
        except ValueError as exc:
            yield number, ValueError(f"not JSON: {exc}")


def parse_import(text: str, *, fmt: str, max_rows: int) -> ParsedImport:
    """Parse CSV (header row) or JSON lines into devices; bad rows are reported, not fatal.

    Row numbers are 1-based data rows (the CSV header is not counted). A device id seen twice
    is an error on the second row. Rows are validated as they are read, so a large file never
    has all its parsed rows in memory at once.
    """
    parsed = ParsedImport([], [], [])
    seen: set[str] = set()
    records = (
        _csv_records(text, max_rows=max_rows)
        if fmt == "csv"
        else _jsonl_records(text, max_rows=max_rows)
    )
    try:
        for number, record in records:
            _add_record(parsed, seen, number, record)
    except csv.Error as exc:
        raise ValueError(f"malformed CSV: {exc}") from exc
    return parsed


def _add_record(parsed: ParsedImport, seen: set[str], number: int, record: Any) -> None:
    if isinstance(record, Exception):
        parsed.errors.append(row_error(number, None, [{"field": "row", "message": str(record)}]))
        return
    device_id = record.get("device_id") if isinstance(record, dict) else None
    try:
        device = DeviceCreate.model_validate(record)
    except ValidationError as exc:
        parsed.errors.append(row_error(number, device_id, field_errors(exc.errors())))
        return
    if device.device_id in seen:
        message = {"field": "device_id", "message": "appears earlier in this file"}
        parsed.errors.append(row_error(number, device.device_id, [message]))
        return
    seen.add(device.device_id)
    parsed.devices.append(device)
    parsed.rows.append(number)
