"""Ending an MQTT session that a stopped subscriber left at the broker.

An ingest connection keeps a persistent session (its queue is what makes a restart lose
nothing). A subscriber that is gone for good — a test's or a benchmark's ingest, a replica
scaled away — leaves that session queueing its share of the city's traffic at the broker until
the session expires (7 days for MQTT 3.1.1 clients with the stack's `persistent_client_expiration`),
which bloats the broker's persistence file and stalls it at every autosave. Connecting once
with a clean session under the same client id and disconnecting removes it.
"""

from __future__ import annotations

import contextlib
import threading

from paho.mqtt.client import Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


def purge_session(
    *,
    host: str,
    port: int,
    username: str,
    password: str,
    client_id: str,
    timeout_s: float = 5.0,
) -> bool:
    """Remove the session of `client_id` (blocking); True when the broker accepted us."""
    connected = threading.Event()
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,  # a 3.1.1 clean session also discards an MQTT 5 session
    )
    client.username_pw_set(username, password)
    client.on_connect = lambda _c, _u, _f, reason, _p: (
        connected.set() if not reason.is_failure else None
    )
    try:
        client.connect(host, port, keepalive=10)
    except OSError:
        return False
    client.loop_start()
    try:
        ok = connected.wait(timeout_s)
        with contextlib.suppress(OSError):
            client.disconnect()
    finally:
        client.loop_stop()
    return ok
