//! End-to-end tests: the `outbox-relay` binary against a real PostgreSQL and a real
//! Kafka-protocol broker (one of each per test run, see `support`), never mocks.
//! Each test has its own database, slot and topics, so they run side by side.

// A failed assumption in a test is a failed test: panics are the point here.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod cases;
mod support;
