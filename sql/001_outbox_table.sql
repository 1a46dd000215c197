-- The outbox table. Applications insert one row per event, in the same transaction as
-- the business change it describes; outbox-relay publishes each committed row to Kafka.
--
--   id              unique event id; becomes the Kafka header "id" (consumers deduplicate on it)
--   aggregate_type  kind of entity ("order"); selects the topic (outbox.event.{aggregate_type})
--   aggregate_id    entity id; becomes the Kafka key, so one entity's events keep their order
--   event_type      what happened ("OrderPlaced"); Kafka header "event_type"
--   payload         the event body; the Kafka value, as PostgreSQL stores the jsonb
--   headers         optional JSON object of extra Kafka headers ({"traceparent": "00-..."})
--   created_at      when the row was written
--
-- Idempotent: safe to run again.
CREATE TABLE IF NOT EXISTS public.outbox (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now()
);
