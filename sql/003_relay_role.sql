-- A least-privilege login for outbox-relay, for a database administrator to run.
--
-- REPLICATION lets it create and stream the logical slot; it needs no superuser, no
-- ownership and no write access. SELECT on the outbox lets `setup` and operators check the
-- table. Set the password afterwards, outside of version control:
--     ALTER ROLE outbox_relay PASSWORD '...';
-- and allow it in pg_hba.conf for the "replication"-capable database connection, e.g.
--     host  app  outbox_relay  10.0.0.0/8  scram-sha-256
--
-- Idempotent: safe to run again.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'outbox_relay') THEN
        CREATE ROLE outbox_relay WITH LOGIN REPLICATION;
    END IF;
END
$$;
DO $$
BEGIN
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO outbox_relay', current_database());
END
$$;
GRANT USAGE ON SCHEMA public TO outbox_relay;
GRANT SELECT ON public.outbox TO outbox_relay;
