"""Type aliases for what the SQL modules accept: a connection (pooled or not) or the pool."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy
Executor: TypeAlias = Conn | asyncpg.Pool


class Params:
    """Positional parameters of a statement built from optional filters.

    `param(value)` records the value and returns its placeholder (`$1`, `$2`, …), so only
    placeholders ever enter the SQL text; pass `*param.values` to the query.
    """

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"
