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
import logging
import threading

from paho.mqtt.client import Client, ConnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = logging.getLogger(__name__)


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
    answered = threading.Event()
    answers: list[ReasonCode] = []
    client = Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv311,
        clean_session=True,  # a 3.1.1 clean session also discards an MQTT 5 session
    )
    client.username_pw_set(username, password)

    def on_connect(
        _c: Client, _u: object, _f: ConnectFlags, reason: ReasonCode, _p: Properties | None
    ) -> None:
        answers.append(reason)
        answered.set()

    client.on_connect = on_connect
    context = {"client_id": client_id, "broker": f"{host}:{port}"}
    try:
        client.connect(host, port, keepalive=10)
    except OSError as exc:
        log.warning("cannot reach the MQTT broker to end a session: %s", exc, extra=context)
        return False
    client.loop_start()
    try:
        answered.wait(timeout_s)
        with contextlib.suppress(OSError):
            client.disconnect()
    finally:
        client.loop_stop()
    if not answers:
        log.warning("the MQTT broker did not answer within %.1f s", timeout_s, extra=context)
        return False
    if answers[0].is_failure:
        log.warning("the MQTT broker refused the connection: %s", answers[0], extra=context)
        return False
    return True
