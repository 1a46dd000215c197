//! End-to-end tests: the `outbox-relay` binary against a real PostgreSQL and a real
//! Kafka-protocol broker (one of each per test run, see `support`), never mocks.
//! Each test has its own database, slot and topics, so they run side by side.

mod cases;
mod support;
