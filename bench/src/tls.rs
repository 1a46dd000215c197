//! The relay over TLS beside plain text, on one backlog: a PostgreSQL that offers TLS
//! (its own CA, a certificate for `localhost`) gets single-row transactions; then the
//! relay drains one slot over plain text (`sslmode=disable`), a twin over TLS with
//! `sslmode=verify-full`, and `pg_recvlogical` a third over TLS the same way (libpq,
//! OpenSSL), the ceiling for any reader of the slot over TLS.

use crate::drain::{self, Scenario};
use crate::{probe, rig};

pub struct Row {
    pub events: u64,
    pub plain: drain::RelayDrain,
    pub tls: drain::RelayDrain,
    pub recvlogical_plain_secs: f64,
    pub recvlogical_tls_secs: f64,
    /// PostgreSQL's CPU seconds (the walsender, mostly) during each drain: relay plain,
    /// relay TLS, pg_recvlogical plain, pg_recvlogical TLS.
    pub pg_cpu: [f64; 4],
}

pub const HEADER: &str = "| backlog | events | relay, plain text: s | events/s | relay, TLS verify-full: s | events/s | TLS / plain | pg_recvlogical plain / TLS: s | relay TLS / pg_recvlogical TLS | relay CPU us/event: plain / TLS | PostgreSQL CPU us/event, relay plain / TLS, pg_recvlogical plain / TLS |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

impl Row {
    pub fn markdown(&self) -> String {
        let n = self.events as f64;
        let us = |seconds: f64| seconds * 1e6 / n;
        format!(
            "| single-row transactions | {} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} / {:.2} | {:.2} | {:.1} / {:.1} | {:.1} / {:.1}, {:.1} / {:.1} |",
            self.events,
            self.plain.secs,
            n / self.plain.secs,
            self.tls.secs,
            n / self.tls.secs,
            self.plain.secs / self.tls.secs,
            self.recvlogical_plain_secs,
            self.recvlogical_tls_secs,
            self.recvlogical_tls_secs / self.tls.secs,
            us(self.plain.cpu),
            us(self.tls.cpu),
            us(self.pg_cpu[0]),
            us(self.pg_cpu[1]),
            us(self.pg_cpu[2]),
            us(self.pg_cpu[3]),
        )
    }
}

/// Starts its own TLS-capable PostgreSQL (same settings as the bench's), writes the
/// backlog, and drains it three ways.
pub async fn drain(events: u64, bootstrap: &str) -> Row {
    let certificates = devrig::Certificates::generate("bench").expect("certificates");
    let postgres = devrig::Postgres::start_configured(&devrig::Options {
        tls: Some(&certificates),
        ..devrig::Options::default()
    })
    .expect("a TLS PostgreSQL");
    let files = std::env::temp_dir().join(format!("outbox-bench-tls-{}", std::process::id()));
    certificates.write_client_files(&files).expect("client files");
    let ca = files.join("ca.crt").display().to_string();
    let run = std::process::id();
    let database = format!("bench_{run}_tls");
    let plain = rig::fresh_database(&format!("{}?sslmode=disable", postgres.url("postgres")), &database).await;
    let tls = format!(
        "postgres://postgres:{}@localhost:{}/{database}?sslmode=verify-full&sslrootcert={ca}",
        postgres.password, postgres.port
    );
    let client = rig::connect(&plain).await;
    let slots = [
        format!("bench_plain_{run}"),
        format!("bench_tls_{run}"),
        format!("bench_recvplain_{run}"),
        format!("bench_recvtls_{run}"),
    ];
    rig::setup(&plain, &slots[0]);
    for slot in &slots[1..] {
        client
            .query_one("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[slot])
            .await
            .expect("a twin slot");
    }
    let scenario = Scenario {
        name: "tls: single-row transactions",
        per_transaction: Some(1),
    };
    let target = drain::write_backlog(&client, scenario, events).await;
    let postmaster = postgres.pid();
    let mut pg_cpu = [0.0; 4];
    let mut before = probe::settled_postgres_cpu(postmaster).await;
    let mut measured = |i: usize, now: f64| {
        pg_cpu[i] = now - before;
        before = now;
    };
    let plain_drain = drain::relay_drain(
        &plain,
        bootstrap,
        &slots[0],
        &format!("bench{run}plain"),
        &target,
        &client,
    )
    .await;
    measured(0, probe::settled_postgres_cpu(postmaster).await);
    let tls_drain = drain::relay_drain(&tls, bootstrap, &slots[1], &format!("bench{run}tls"), &target, &client).await;
    measured(1, probe::settled_postgres_cpu(postmaster).await);
    let recvlogical_plain_secs = drain::recvlogical_drain(&plain, &slots[2], &target);
    measured(2, probe::settled_postgres_cpu(postmaster).await);
    let recvlogical_tls_secs = drain::recvlogical_drain(&tls, &slots[3], &target);
    measured(3, probe::settled_postgres_cpu(postmaster).await);
    println!(
        "tls: relay plain {:.2} s, relay TLS {:.2} s, pg_recvlogical plain {recvlogical_plain_secs:.2} s, TLS {recvlogical_tls_secs:.2} s",
        plain_drain.secs, tls_drain.secs
    );
    let _ = std::fs::remove_dir_all(files);
    Row {
        events,
        plain: plain_drain,
        tls: tls_drain,
        recvlogical_plain_secs,
        recvlogical_tls_secs,
        pg_cpu,
    }
}
