-- Rules service (issue 4): per-device rule state and the ticket-event outbox.

-- What rules remember about a device, written in the same transaction as the ticket changes it
-- caused, and read back when a replica is assigned the device's Kafka partition.
CREATE TABLE rule_state (
    device_id          text PRIMARY KEY,
    kind               text NOT NULL,
    kafka_partition    integer NOT NULL CHECK (kafka_partition >= 0),
    last_seq           bigint NOT NULL,           -- highest reading seq acted on (replays at or below it are ignored)
    last_ts            timestamptz,               -- measurement time of that reading (detects seq counter resets)
    last_seen_at       timestamptz,               -- arrival time of the last message (offline timers)
    last_status_offset bigint NOT NULL DEFAULT -1, -- status messages carry no seq: their Kafka offset orders them
    pending            jsonb NOT NULL DEFAULT '{}'::jsonb,  -- duration rules: {rule: {"since": epoch_s, "details": {...}}}
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rule_state_partition ON rule_state (kafka_partition);

-- Ticket events not yet acknowledged by Kafka: written with the transition, deleted after the
-- produce is acknowledged, re-published by any replica if a crash left them behind.
CREATE TABLE rule_outbox (
    transition_id bigint PRIMARY KEY REFERENCES ticket_transitions (id),
    device_id     text NOT NULL,
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rule_outbox_created ON rule_outbox (created_at);
