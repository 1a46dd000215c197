//! The bench's own plumbing: connections, fresh databases with the outbox and a slot, the
//! relay binary next to this one.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use tokio_postgres::{Client, NoTls};

/// `outbox-relay`, built by the same `cargo build` as this benchmark.
pub fn relay_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent().expect("target dir").join("outbox-relay")
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

/// Creates an empty database; returns its URL.
pub async fn fresh_database(admin_url: &str, name: &str) -> String {
    connect(admin_url)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("db");
    match admin_url.split_once('?') {
        Some((path, query)) => format!("{}?{query}", with_database(path, name)),
        None => with_database(admin_url, name),
    }
}

fn with_database(url: &str, name: &str) -> String {
    match url.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{name}"),
        None => panic!("DATABASE_URL must name a database"),
    }
}

/// Drops a database made by [`fresh_database`] and its replication slots (which would
/// keep it), whoever is still connected.
pub async fn drop_database(admin_url: &str, name: &str) {
    let admin = connect(admin_url).await;
    admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
            &[&name],
        )
        .await
        .expect("drop the database's slots");
    let _ = admin.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)")).await;
}

/// `outbox-relay setup --apply-sql`: the outbox table, the publication and `slot`.
pub fn setup(url: &str, slot: &str) {
    let status = Command::new(relay_binary())
        .args(["setup", "--apply-sql", "--slot", slot])
        .env("DATABASE_URL", url)
        .stdout(Stdio::null())
        .status()
        .expect("setup");
    assert!(status.success(), "outbox-relay setup failed");
}

/// A slot's `confirmed_flush_lsn`, as text.
pub async fn confirmed(client: &Client, slot: &str) -> String {
    client
        .query_one(
            "SELECT coalesce(confirmed_flush_lsn::text, '0/0') FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot")
        .get(0)
}

/// Whether a slot's `confirmed_flush_lsn` has reached `target`.
pub async fn reached(client: &Client, slot: &str, target: &str) -> bool {
    client
        .query_one(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot, &target],
        )
        .await
        .expect("slot")
        .get::<_, Option<bool>>(0)
        .unwrap_or(false)
}
