-- api (issue 5): read-model ordering, list/filter indexes, SSE resume support.

-- When the `online` flag was last decided; status messages older than this never win.
ALTER TABLE device_connectivity ADD COLUMN status_at timestamptz;
UPDATE device_connectivity SET status_at = changed_at WHERE status_at IS NULL;
ALTER TABLE device_connectivity ALTER COLUMN status_at SET NOT NULL;
CREATE INDEX api_connectivity_online ON device_connectivity (online, device_id);

-- Tickets list: newest first, filtered by status / department / priority.
CREATE INDEX api_tickets_department ON tickets (department, status);
CREATE INDEX api_tickets_open_by_district ON tickets (district, priority)
    WHERE status IN ('open', 'acknowledged', 'in_progress');

-- Device list by kind alone (district-only and kind+district already have indexes).
CREATE INDEX api_devices_kind ON devices (kind, device_id);

-- District KPIs read the latest reading of every device of a district.
CREATE INDEX api_device_state_kind ON device_state (kind, device_id);

-- Drop readings_YYYYMMDD partitions whose whole day is before `before_day`; returns how many.
CREATE FUNCTION cityops_drop_reading_partitions(before_day date)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid
        JOIN pg_class p ON p.oid = i.inhparent
        WHERE p.relname = 'readings' AND c.relname ~ '^readings_[0-9]{8}$'
          AND to_date(substr(c.relname, 10), 'YYYYMMDD') < before_day
    LOOP
        EXECUTE format('DROP TABLE %I', part.relname);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END $$;
