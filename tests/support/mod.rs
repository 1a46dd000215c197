//! Shared test rig: one PostgreSQL and one broker per test run (or the real ones named by
//! `DATABASE_URL` / `KAFKA_BOOTSTRAP_SERVERS`), and per-test databases, slots and topics
//! so that tests run side by side.

#![allow(dead_code)]

pub mod kafka;
pub mod rabbitmq;
pub mod relay;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use outbox_relay::lsn::Lsn;
use tokio_postgres::{Client, NoTls};

pub use kafka::Record;
pub use relay::Relay;

/// The services every test shares.
pub struct Services {
    admin_url: String,
    pub bootstrap_servers: String,
    _postgres: Option<devrig::Postgres>,
    _broker: Option<devrig::Broker>,
}

impl Services {
    /// URL of `database` on the shared server.
    pub fn url_for(&self, database: &str) -> String {
        with_database(&self.admin_url, database)
    }
}

/// Replaces the database in a `postgres://` URL.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_part = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    format!("{host_part}/{database}{query}")
}

pub fn services() -> &'static Services {
    static SERVICES: OnceLock<Services> = OnceLock::new();
    SERVICES.get_or_init(|| {
        let (admin_url, postgres) = match std::env::var("DATABASE_URL") {
            Ok(url) => (url, None),
            Err(_) => {
                let postgres = devrig::Postgres::start().unwrap_or_else(|e| panic!("cannot start PostgreSQL: {e}"));
                (postgres.url("postgres"), Some(postgres))
            }
        };
        let (bootstrap_servers, broker) = match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
            Ok(servers) => (servers, None),
            Err(_) => {
                let broker = devrig::Broker::start().unwrap_or_else(|e| panic!("cannot start tansu: {e}"));
                (broker.bootstrap_servers(), Some(broker))
            }
        };
        Services {
            admin_url,
            bootstrap_servers,
            _postgres: postgres,
            _broker: broker,
        }
    })
}

pub async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One test's own database (with the shipped outbox table and publication), slot and
/// topic prefix.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub slot: String,
    pub publication: String,
    pub bootstrap_servers: String,
    /// Topics of this test are `<name>.<aggregate_type>`.
    pub topic_template: String,
    pub client: Client,
}

impl TestDb {
    /// Creates the database on the shared server and runs `outbox-relay setup --apply-sql`.
    pub async fn new(test: &str) -> TestDb {
        let services = services();
        let db = Self::create(&services.url_for("postgres"), &services.bootstrap_servers, test).await;
        db.setup();
        db
    }

    /// A database of its own on the shared server with nothing in it: no outbox table,
    /// publication or slot (for tests that bring their own table).
    pub async fn empty(test: &str) -> TestDb {
        let services = services();
        Self::create(&services.url_for("postgres"), &services.bootstrap_servers, test).await
    }

    /// As [`new`](Self::new), on a private server (for tests that restart or break it).
    pub async fn on(postgres: &devrig::Postgres, bootstrap_servers: &str, test: &str) -> TestDb {
        let db = Self::create(&postgres.url("postgres"), bootstrap_servers, test).await;
        db.setup();
        db
    }

    /// As [`new`](Self::new), on a server the tests reach at `client_admin_url` and the
    /// relay at `relay_admin_url` (e.g. a Unix socket for the tests, TLS for the relay).
    pub async fn split(client_admin_url: &str, relay_admin_url: &str, test: &str) -> TestDb {
        let mut db = Self::create(client_admin_url, &services().bootstrap_servers, test).await;
        db.url = with_database(relay_admin_url, &db.name);
        db.setup();
        db
    }

    /// Runs `outbox-relay setup --apply-sql`.
    pub fn setup(&self) {
        let db = self;
        let output = relay::command()
            .args(["setup", "--apply-sql"])
            .env("DATABASE_URL", &db.url)
            .env("OUTBOX_RELAY_SLOT", &db.slot)
            .output()
            .unwrap_or_else(|e| panic!("cannot run setup: {e}"));
        assert!(
            output.status.success(),
            "setup failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Creates an empty database on the server of `admin_url`.
    async fn create(admin_url: &str, bootstrap_servers: &str, test: &str) -> TestDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t_{test}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        let url = with_database(admin_url, &name);
        let client = connect(&url).await;
        TestDb {
            slot: name.clone(),
            publication: "outbox_pub".into(),
            topic_template: format!("{name}.{{aggregate_type}}"),
            bootstrap_servers: bootstrap_servers.to_owned(),
            name,
            url,
            client,
        }
    }

    /// `outbox-relay <subcommand>` with this database's settings (URL, broker, slot,
    /// topics); a later `.env` overrides one.
    pub fn command(&self, subcommand: &str) -> std::process::Command {
        let mut command = relay::command();
        command
            .arg(subcommand)
            .env("DATABASE_URL", &self.url)
            .env("KAFKA_BOOTSTRAP_SERVERS", &self.bootstrap_servers)
            .env("OUTBOX_RELAY_SLOT", &self.slot)
            .env("OUTBOX_RELAY_PUBLICATION", &self.publication)
            .env("OUTBOX_RELAY_TOPIC_TEMPLATE", &self.topic_template)
            .env("OUTBOX_RELAY_DEAD_LETTER_TOPIC", format!("{}.dlq", self.name));
        command
    }

    pub fn topic(&self, aggregate_type: &str) -> String {
        format!("{}.{aggregate_type}", self.name)
    }

    /// Starts `outbox-relay run` for this database.
    pub fn relay(&self) -> Relay {
        Relay::start(self, &[])
    }

    pub fn relay_with(&self, extra_args: &[&str]) -> Relay {
        Relay::start(self, extra_args)
    }

    /// Inserts one event in its own transaction; returns its id.
    pub async fn insert_event(&self, aggregate_type: &str, aggregate_id: &str, payload: &str) -> String {
        insert_event(&self.client, aggregate_type, aggregate_id, payload).await
    }

    pub async fn current_wal_lsn(&self) -> Lsn {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        parse_lsn(row.get(0))
    }

    pub async fn confirmed_flush_lsn(&self) -> Lsn {
        let row = self
            .client
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        parse_lsn(row.get(0))
    }

    /// Waits until the slot's confirmed position reaches `target`.
    pub async fn wait_confirmed(&self, target: Lsn, timeout: Duration) -> Lsn {
        eventually(timeout, &format!("confirmed_flush_lsn to reach {target}"), || async {
            let confirmed = self.confirmed_flush_lsn().await;
            (confirmed >= target).then_some(confirmed)
        })
        .await
    }

    /// Waits until the slot has confirmed all WAL written so far.
    pub async fn wait_all_confirmed(&self) {
        let target = self.current_wal_lsn().await;
        self.wait_confirmed(target, Duration::from_secs(30)).await;
    }

    /// Drops the slot and database (for runs against long-lived real servers).
    pub async fn drop(self) {
        let admin = connect(&services().url_for("postgres")).await;
        let _ = admin
            .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active", &[&self.slot])
            .await;
        drop(self.client);
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .await;
    }
}

/// Inserts one event through `client` in its own transaction; returns its id.
pub async fn insert_event(client: &Client, aggregate_type: &str, aggregate_id: &str, payload: &str) -> String {
    let row = client
        .query_one(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload)
             VALUES ($1, $2, 'Tested', $3::text::jsonb) RETURNING id::text",
            &[&aggregate_type, &aggregate_id, &payload],
        )
        .await
        .unwrap_or_else(|e| panic!("insert failed: {e}"));
    row.get(0)
}

/// The standard output of a command that must have exited 0; otherwise the test fails
/// with both of its outputs.
pub fn stdout_of_success(output: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{what}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

pub fn parse_lsn(text: Option<String>) -> Lsn {
    text.and_then(|t| t.parse().ok()).unwrap_or(Lsn::ZERO)
}
