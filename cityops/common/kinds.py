"""Device kinds and the small fixed vocabularies shared by every service."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """A kind of street furniture; used in topics, payloads, API and metric labels."""

    STREETLIGHT = "streetlight"
    MANHOLE = "manhole"
    WASTEBIN = "wastebin"
    PARKING = "parking"


class RejectReason(StrEnum):
    """Why ingest refused a message: the dead-letter `reason` header and metric label (A5)."""

    TOO_LARGE = "too_large"
    NOT_JSON = "not_json"
    SCHEMA = "schema"
    TOPIC = "topic"
    ID_MISMATCH = "id_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    CLOCK_SKEW = "clock_skew"
    TS_OUT_OF_RANGE = "ts_out_of_range"
    RATE_LIMITED = "rate_limited"
    RETAINED = "retained"
    UNPROCESSABLE = "unprocessable"


class Priority(StrEnum):
    """Ticket priority; P1 is the most urgent."""

    P1 = "P1"
    P2 = "P2"
    P3 = "P3"
    P4 = "P4"


class TicketStatus(StrEnum):
    """Ticket lifecycle states (A7)."""

    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    IN_PROGRESS = "in_progress"
    RESOLVED = "resolved"
    CLOSED = "closed"


KINDS: frozenset[str] = frozenset(k.value for k in Kind)
