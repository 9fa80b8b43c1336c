-- cityops foundation schema: registry, live state, history, tickets, audit, API keys.
-- Migrations are numbered by domain: 00xx foundation, 01xx rules, 02xx api, 03xx operations.

-- Device registry ---------------------------------------------------------------------------
CREATE TABLE devices (
    device_id            text PRIMARY KEY CHECK (device_id ~ '^[A-Za-z0-9_.-]{3,64}$'),
    kind                 text NOT NULL CHECK (kind IN ('streetlight', 'manhole', 'wastebin', 'parking')),
    district             text NOT NULL DEFAULT 'unassigned' CHECK (length(district) BETWEEN 1 AND 64),
    zone                 text CHECK (length(zone) <= 64),
    lat                  double precision CHECK (lat BETWEEN -90 AND 90),
    lon                  double precision CHECK (lon BETWEEN -180 AND 180),
    reporting_interval_s integer NOT NULL DEFAULT 300 CHECK (reporting_interval_s BETWEEN 1 AND 604800),
    metadata             jsonb NOT NULL DEFAULT '{}'::jsonb,  -- e.g. per-device rule thresholds
    enabled              boolean NOT NULL DEFAULT true,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CHECK ((lat IS NULL) = (lon IS NULL))
);
CREATE INDEX devices_kind_district ON devices (kind, district, device_id);
CREATE INDEX devices_district ON devices (district, device_id);
-- bbox queries: point(lon, lat) <@ box(...) uses this GiST index.
CREATE INDEX devices_location ON devices USING gist (point(lon, lat)) WHERE lat IS NOT NULL;

-- Per-device MQTT credentials: only a hash; the broker's password file is rendered from here.
CREATE TABLE device_credentials (
    device_id     text PRIMARY KEY REFERENCES devices (device_id) ON DELETE CASCADE,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

-- Per-district settings (rule threshold overrides, parking limits, ...).
CREATE TABLE districts (
    district   text PRIMARY KEY CHECK (length(district) BETWEEN 1 AND 64),
    name       text,
    metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Live state: the latest reading per device, only ever moved forward by a newer seq.
CREATE TABLE device_state (
    device_id    text PRIMARY KEY,
    kind         text NOT NULL,
    seq          bigint NOT NULL,
    ts           timestamptz NOT NULL,
    received_at  timestamptz NOT NULL,
    reading      jsonb NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Connectivity: online/offline from status messages and the last time anything was heard.
CREATE TABLE device_connectivity (
    device_id     text PRIMARY KEY,
    online        boolean NOT NULL,
    last_seen_at  timestamptz NOT NULL,
    changed_at    timestamptz NOT NULL
);

-- History: range-partitioned by measurement time, one partition per day.
CREATE TABLE readings (
    device_id   text NOT NULL,
    kind        text NOT NULL,
    seq         bigint NOT NULL,
    ts          timestamptz NOT NULL,
    received_at timestamptz NOT NULL,
    reading     jsonb NOT NULL,
    PRIMARY KEY (device_id, ts, seq)
) PARTITION BY RANGE (ts);
-- Rows outside every daily partition (a device clock far in the past) land here, never lost.
CREATE TABLE readings_default PARTITION OF readings DEFAULT;

-- Create daily partitions readings_YYYYMMDD for [first_day, first_day + days).
CREATE FUNCTION cityops_ensure_reading_partitions(first_day date, days integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    day date;
    created integer := 0;
    part text;
BEGIN
    FOR i IN 0 .. days - 1 LOOP
        day := first_day + i;
        part := format('readings_%s', to_char(day, 'YYYYMMDD'));
        IF to_regclass(part) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF readings FOR VALUES FROM (%L) TO (%L)',
                part, day::timestamptz AT TIME ZONE 'UTC', (day + 1)::timestamptz AT TIME ZONE 'UTC');
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END $$;

-- Tickets (A7) ----------------------------------------------------------------------------
CREATE TABLE tickets (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id       text NOT NULL,
    kind            text NOT NULL,
    district        text NOT NULL,
    rule            text NOT NULL,
    priority        text NOT NULL CHECK (priority IN ('P1', 'P2', 'P3', 'P4')),
    department      text NOT NULL,
    status          text NOT NULL CHECK (status IN ('open', 'acknowledged', 'in_progress', 'resolved', 'closed')),
    opened_at       timestamptz NOT NULL,
    due_at          timestamptz NOT NULL,
    acknowledged_at timestamptz,
    resolved_at     timestamptz,
    closed_at       timestamptz,
    assignee        text,
    occurrences     integer NOT NULL DEFAULT 1 CHECK (occurrences >= 1),
    last_seen_at    timestamptz NOT NULL,
    details         jsonb NOT NULL,
    resolution      text,
    escalations     integer NOT NULL DEFAULT 0,
    escalated_at    timestamptz,
    version         integer NOT NULL DEFAULT 1
);
-- One unresolved ticket per (device, rule), enforced here and not by application luck.
CREATE UNIQUE INDEX tickets_one_open_per_device_rule
    ON tickets (device_id, rule) WHERE status IN ('open', 'acknowledged', 'in_progress');
CREATE INDEX tickets_status_due ON tickets (status, due_at);
CREATE INDEX tickets_district ON tickets (district, status);
CREATE INDEX tickets_device ON tickets (device_id, opened_at DESC);

-- Every transition, append-only.
CREATE TABLE ticket_transitions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ticket_id     bigint NOT NULL REFERENCES tickets (id),
    at            timestamptz NOT NULL DEFAULT now(),
    action        text NOT NULL,  -- opened, occurrence, escalated, auto_resolved, acknowledged, ...
    from_status   text,
    to_status     text NOT NULL,
    from_priority text,
    to_priority   text NOT NULL,
    actor         text NOT NULL,  -- 'rules' or 'apikey:<name>'
    version       integer NOT NULL,
    details       jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX ticket_transitions_ticket ON ticket_transitions (ticket_id, id);

CREATE FUNCTION cityops_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END $$;
CREATE TRIGGER ticket_transitions_append_only
    BEFORE UPDATE OR DELETE ON ticket_transitions
    FOR EACH ROW EXECUTE FUNCTION cityops_forbid_change();

-- API keys: only a SHA-256 of the key is stored.
CREATE TABLE api_keys (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
    key_hash     bytea NOT NULL UNIQUE,
    scopes       text[] NOT NULL CHECK (scopes <@ ARRAY['read', 'operate', 'admin']::text[]),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz,
    last_used_at timestamptz
);
