-- api: the outbox of the API's Kafka events (registry changes on city.devices.v1, operator
-- ticket transitions on city.tickets.v1). A row is written in the same transaction as the
-- change it describes, produced to Kafka after the commit and deleted once Kafka acknowledged
-- it; rows a failed produce or a crash left behind are re-published by the sweep of any API
-- replica, in id order. Delivery is at-least-once.
CREATE TABLE api_outbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- publishing order
    topic      text NOT NULL,
    key        text NOT NULL,                                     -- the record key (device_id)
    payload    jsonb,                                             -- NULL: a tombstone (device deleted)
    created_at timestamptz NOT NULL DEFAULT now()
);
