-- Operators' read model (issue 6): schema `ops` holds the views that Grafana and the city-metrics
-- collector read, and role `cityops_grafana` may read those views and nothing else.
--
-- Views run with their owner's rights, so the reader needs no grant on the base tables: it can
-- never see device_credentials or api_keys, and it cannot write anything.

CREATE SCHEMA ops;

-- One row per registered device: where it is, whether it is heard, and how urgent it is.
-- state_code orders the map colours: 0 ok, 1 never seen, 2 open ticket, 3 offline, 4 open P1.
CREATE VIEW ops.devices AS
WITH open_tickets AS (
    SELECT device_id,
           count(*) AS open_tickets,
           min(priority) AS top_priority,  -- 'P1' < 'P2' < ... as text
           bool_or(rule IN ('lamp_out', 'lamp_fault')) AS lamp_ticket,
           bool_or(now() > due_at) AS overdue
    FROM tickets
    WHERE status IN ('open', 'acknowledged', 'in_progress')
    GROUP BY device_id
), heard AS (
    SELECT d.device_id,
           CASE
               WHEN c.last_seen_at IS NULL THEN s.received_at
               WHEN s.received_at IS NULL THEN c.last_seen_at
               ELSE greatest(c.last_seen_at, s.received_at)
           END AS last_seen_at,
           c.online AS reported_online
    FROM devices d
    LEFT JOIN device_connectivity c USING (device_id)
    LEFT JOIN device_state s USING (device_id)
)
SELECT d.device_id,
       d.kind,
       d.district,
       d.zone,
       d.lat,
       d.lon,
       d.reporting_interval_s,
       h.last_seen_at,
       CASE
           WHEN h.last_seen_at IS NULL THEN 'never_seen'
           WHEN h.reported_online IS FALSE
                OR h.last_seen_at < now() - make_interval(secs => 3 * d.reporting_interval_s)
               THEN 'offline'
           ELSE 'online'
       END AS connectivity,
       coalesce(t.open_tickets, 0) AS open_tickets,
       t.top_priority,
       coalesce(t.overdue, false) AS overdue,
       -- lamps out: the lamp says it failed, or the rules hold a lamp ticket open (lamp_out is
       -- "dark while the schedule says lit", which only the rules service can judge).
       d.kind = 'streetlight' AND (
           coalesce(s.reading ->> 'fault', 'none') <> 'none' OR coalesce(t.lamp_ticket, false)
       ) AS lamp_out,
       d.kind = 'wastebin' AND coalesce((s.reading ->> 'fill_pct')::float8 >= 90, false)
           AS bin_full,
       (s.reading ->> 'fill_pct')::float8 AS fill_pct,
       CASE WHEN d.kind = 'parking' THEN (s.reading ->> 'occupied')::boolean END AS occupied,
       s.ts AS reading_ts,
       s.reading
FROM devices d
JOIN heard h USING (device_id)
LEFT JOIN device_state s USING (device_id)
LEFT JOIN open_tickets t USING (device_id)
WHERE d.enabled;

-- The geomap's layer: one point per located device with a colour code and a short label.
CREATE VIEW ops.device_map AS
SELECT device_id,
       kind,
       district,
       lat,
       lon,
       connectivity,
       CASE
           WHEN top_priority = 'P1' THEN 4
           WHEN connectivity = 'offline' THEN 3
           WHEN open_tickets > 0 THEN 2
           WHEN connectivity = 'never_seen' THEN 1
           ELSE 0
       END AS state_code,
       CASE
           WHEN top_priority = 'P1' THEN 'urgent ticket'
           WHEN connectivity = 'offline' THEN 'offline'
           WHEN open_tickets > 0 THEN 'open ticket'
           WHEN connectivity = 'never_seen' THEN 'never seen'
           ELSE 'ok'
       END AS state,
       open_tickets,
       top_priority,
       last_seen_at
FROM ops.devices
WHERE lat IS NOT NULL;

-- Tickets with their SLA outcome: met (resolved by due_at), missed (resolved late, or still
-- unresolved past due_at), or pending (unresolved, not yet due).
CREATE VIEW ops.tickets AS
SELECT id,
       device_id,
       kind,
       district,
       rule,
       priority,
       department,
       status,
       opened_at,
       due_at,
       acknowledged_at,
       resolved_at,
       closed_at,
       occurrences,
       escalations,
       status IN ('open', 'acknowledged', 'in_progress') AS unresolved,
       status IN ('open', 'acknowledged', 'in_progress') AND now() > due_at AS overdue,
       CASE
           WHEN resolved_at IS NOT NULL AND resolved_at <= due_at THEN 'met'
           WHEN resolved_at IS NOT NULL OR now() > due_at THEN 'missed'
           ELSE 'pending'
       END AS sla,
       coalesce(resolved_at, now()) - opened_at AS age
FROM tickets;

-- Reading history with the device's district, for time series panels (filter on ts!).
CREATE VIEW ops.readings AS
SELECT r.device_id, r.kind, d.district, r.ts, r.received_at, r.reading
FROM readings r
JOIN devices d USING (device_id);

-- Districts that exist in the registry or in the districts table (template variable).
CREATE VIEW ops.districts AS
SELECT district FROM devices
UNION
SELECT district FROM districts;

-- Grant the reader everything in `ops`; callable again by the owner after the role is created
-- later (e.g. by the stack, which holds the rights to create login roles).
CREATE FUNCTION ops.grant_reader(reader name DEFAULT 'cityops_grafana')
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = reader) THEN
        RETURN false;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA ops TO %I', reader);
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA ops TO %I', reader);
    RETURN true;
END $$;
REVOKE EXECUTE ON FUNCTION ops.grant_reader(name) FROM PUBLIC;

-- Create the role when the migrating user may (compose runs migrations as a superuser); the
-- native stack's `cityops` role may not, so the stack creates the login role itself.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cityops_grafana')
       AND EXISTS (SELECT 1 FROM pg_roles
                   WHERE rolname = current_user AND (rolsuper OR rolcreaterole)) THEN
        CREATE ROLE cityops_grafana NOLOGIN;
        ALTER ROLE cityops_grafana SET default_transaction_read_only = on;
        ALTER ROLE cityops_grafana SET statement_timeout = '15s';
    END IF;
    IF NOT ops.grant_reader('cityops_grafana') THEN
        RAISE NOTICE 'role cityops_grafana does not exist yet: run SELECT ops.grant_reader() '
                     'after creating it';
    END IF;
END $$;
