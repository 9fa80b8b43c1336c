"""A broker of a test's own for the broker's tests (ports 18830-18899).

Tests that restart, kill or crash a broker must not touch the shared one (others' tests use
it): `own_broker_running()` makes a `cityops.stack.mosquitto_instance.BrokerInstance` (the
stack's rendered config, binary and auth plugin, in a temp folder, on a free port of `PORTS`)
with fresh ingest, gateway and dispatcher accounts, starts it and removes it afterwards. The
`own_broker` fixture (conftest.py) is one per test.

    async def test_x(own_broker: BrokerInstance) -> None:
        password = own_broker.provision("wb-1")   # the plugin follows: no signal
        ...connect to own_broker.host / own_broker.port...
        own_broker.kill(); own_broker.start()
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

from cityops.stack.credentials import DISPATCHER_USER, GATEWAY_USER, INGEST_USER
from cityops.stack.mosquitto_instance import BrokerInstance, broker_tempdir, free_port

PORTS = range(18830, 18900)


@contextlib.contextmanager
def own_broker_running(*, ports: range = PORTS) -> Iterator[BrokerInstance]:
    """A started broker of the caller's own with fresh service accounts; removed afterwards."""
    users = (INGEST_USER, GATEWAY_USER, DISPATCHER_USER)
    accounts = {user: secrets.token_urlsafe(16) for user in users}
    with broker_tempdir("cityops-broker-") as home:
        broker = BrokerInstance.create(home, port=free_port(ports), accounts=accounts)
        try:
            broker.start()
            yield broker
        finally:
            broker.close()
