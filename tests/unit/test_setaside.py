"""Telling a record at fault from an outage; dead-letter headers; the task supervisor."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg
import pytest
from aiokafka import ConsumerRecord

from cityops.common.ops import TaskSupervisor
from cityops.common.setaside import UNPROCESSABLE, deadletter_headers, describe, is_data_error


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.DataError(
            "invalid input for query argument $4 (date value out of range)"
        ),
        asyncpg.exceptions.UntranslatableCharacterError("unsupported Unicode escape sequence"),
        asyncpg.exceptions.CharacterNotInRepertoireError("invalid byte sequence"),
        asyncpg.exceptions.NotNullViolationError("null value in column"),
        asyncpg.exceptions.ProgramLimitExceededError("index row size exceeds maximum"),
        OverflowError("date value out of range"),
        ValueError("year 0 is out of range"),
    ],
    ids=type,
)
def test_data_errors_blame_the_record(exc: BaseException) -> None:
    assert is_data_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connection refused"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator"),
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients"),
        asyncpg.exceptions.UndefinedTableError("relation does not exist"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        TimeoutError(),
    ],
    ids=type,
)
def test_outages_blame_a_dependency(exc: BaseException) -> None:
    assert not is_data_error(exc)


def test_dead_letter_headers_say_where_and_why_and_bound_the_detail() -> None:
    record: ConsumerRecord[bytes, bytes] = ConsumerRecord(
        topic="city.telemetry.v1",
        partition=4,
        offset=1234,
        timestamp=0,
        timestamp_type=0,
        key=b"wb-1",
        value=b"x" * 20_000,
        checksum=None,
        serialized_key_size=4,
        serialized_value_size=20_000,
        headers=(),
    )
    detail = describe(ValueError("bad\n value " + "y" * 1000))
    headers = dict(
        deadletter_headers(record, consumer="rules", reason=UNPROCESSABLE, detail=detail)
    )
    assert headers["reason"] == b"unprocessable"
    assert headers["consumer"] == b"rules"
    assert headers["source_topic"] == b"city.telemetry.v1"
    assert (headers["source_partition"], headers["source_offset"]) == (b"4", b"1234")
    assert headers["original_size"] == b"20000"
    assert headers["sha256"] == hashlib.sha256(b"x" * 20_000).hexdigest().encode()
    assert headers["detail"].startswith(b"ValueError: bad value y")
    assert len(headers["detail"]) == 500


async def test_a_task_that_ends_on_its_own_fails_the_service() -> None:
    stop = asyncio.Event()
    supervisor = TaskSupervisor(stop)

    async def crashes() -> None:
        raise RuntimeError("bug")

    supervisor.watch(asyncio.create_task(crashes(), name="projector"))
    await asyncio.wait_for(stop.wait(), 5)
    assert supervisor.failed == ["projector"]
    assert not supervisor.healthy()
    assert supervisor.exit_code == 1


async def test_tasks_that_end_after_stop_are_a_clean_exit() -> None:
    stop = asyncio.Event()
    supervisor = TaskSupervisor(stop)

    async def until_stopped() -> None:
        await stop.wait()

    task = supervisor.watch(asyncio.create_task(until_stopped(), name="relay"))
    stop.set()
    await task
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert supervisor.healthy()
    assert supervisor.exit_code == 0
