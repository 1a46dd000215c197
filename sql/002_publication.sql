-- The publication outbox-relay streams: only the outbox table, and only its inserts.
-- Updates and deletes of outbox rows (for example a cleanup job) are never published.
--
-- The name must match the relay's --publication / OUTBOX_RELAY_PUBLICATION
-- (default outbox_pub). Idempotent: safe to run again.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_pub') THEN
        CREATE PUBLICATION outbox_pub FOR TABLE public.outbox WITH (publish = 'insert');
    END IF;
END
$$;
