-- A least-privilege login for outbox-relay, for a database administrator to run.
--
-- REPLICATION lets it create and stream the logical slot; it needs no superuser and no
-- ownership. SELECT on the outbox lets `setup` and operators check the table; DELETE is
-- used only by `run --retention` to remove rows whose events are published (revoke it if
-- you do not use retention). Set the password afterwards, outside of version control:
--     ALTER ROLE outbox_relay PASSWORD '...';
-- and allow it in pg_hba.conf, over TLS, for the database (logical replication
-- connections match the database's lines, not "replication"), e.g.
--     hostssl  app  outbox_relay  10.0.0.0/8  scram-sha-256
-- On Amazon RDS / Aurora, where REPLICATION cannot be granted, use instead:
--     GRANT rds_replication TO outbox_relay;
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
GRANT SELECT, DELETE ON public.outbox TO outbox_relay;
