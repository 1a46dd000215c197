-- How an application writes an event: the business change and the outbox row commit
-- together, or not at all. Nothing else is needed; outbox-relay does the publishing.
BEGIN;

CREATE TABLE IF NOT EXISTS public.orders (
    id       text PRIMARY KEY,
    customer text NOT NULL,
    total    numeric NOT NULL
);

INSERT INTO public.orders (id, customer, total) VALUES ('order-1001', 'alice', 42.50);

INSERT INTO public.outbox (aggregate_type, aggregate_id, event_type, payload, headers)
VALUES (
    'order',                       -- topic outbox.event.order
    'order-1001',                  -- Kafka key: all events of this order stay in order
    'OrderPlaced',
    '{"orderId": "order-1001", "customer": "alice", "total": 42.50}',
    '{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}'
);

COMMIT;
