//! Issue 9, TLS: a PostgreSQL that refuses every connection without TLS (normal and
//! replication alike). `setup`, `check`, `run` and `status` work with verify-full and a
//! password, and with a client certificate; a wrong CA, a name mismatch, an expired
//! certificate and plain text fail with messages that say why.

use std::path::PathBuf;
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use crate::support::kafka::Consumer;
use crate::support::relay::command;
use crate::support::{connect, TestDb};

/// The role that authenticates with its client certificate alone.
const CERT_USER: &str = "certuser";

const TLS_ONLY_HBA: &str = "\
local all all trust
hostnossl all all all reject
hostnossl replication all all reject
hostssl all certuser all cert
hostssl replication certuser all cert
hostssl all all all scram-sha-256
hostssl replication all all scram-sha-256
";

/// One TLS-only server for this module's tests, and the client's certificate files.
struct TlsServer {
    postgres: devrig::Postgres,
    certificates: devrig::Certificates,
    files: PathBuf,
}

impl TlsServer {
    fn file(&self, name: &str) -> String {
        self.files.join(name).display().to_string()
    }

    /// The relay's URL for the `postgres` database with a password and `query`.
    fn password_url(&self, host: &str, query: &str) -> String {
        format!(
            "postgres://postgres:{}@{host}:{}/postgres?{query}",
            self.postgres.password, self.postgres.port
        )
    }

    fn verify_full(&self) -> String {
        self.password_url(
            "localhost",
            &format!("sslmode=verify-full&sslrootcert={}", self.file("ca.crt")),
        )
    }
}

fn tls_server() -> &'static TlsServer {
    static SERVER: OnceLock<TlsServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let certificates = devrig::Certificates::generate(CERT_USER).unwrap_or_else(|e| panic!("{e}"));
        let postgres = start_tls_only(&certificates);
        let files = std::env::temp_dir().join(format!("outbox-relay-tls-client-{}", std::process::id()));
        certificates
            .write_client_files(&files)
            .unwrap_or_else(|e| panic!("{e}"));
        TlsServer {
            postgres,
            certificates,
            files,
        }
    })
}

/// Runs a relay subcommand to completion with `url`.
fn run_command(db: &TestDb, subcommand: &str, url: &str, extra: &[&str]) -> (String, Output) {
    let output = db
        .command(subcommand)
        .args(extra)
        .env("DATABASE_URL", url)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (text, output)
}

/// A database on the TLS-only server, set up by the relay through `relay_base_url`.
async fn tls_db(test: &str, relay_base_url: &str) -> TestDb {
    let server = tls_server();
    let admin = connect(&server.postgres.socket_url("postgres")).await;
    let _ = admin
        .batch_execute(&format!("CREATE ROLE {CERT_USER} LOGIN SUPERUSER REPLICATION"))
        .await;
    TestDb::split(&server.postgres.socket_url("postgres"), relay_base_url, test).await
}

/// Publishes through a relay with the db's URL and checks that the walsender it holds
/// runs on TLS.
async fn publishes_over_tls(db: &TestDb) {
    let mut relay = db.relay();
    let id = db.insert_event("order", "order-1", r#"{"n": 1}"#).await;
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "the event over TLS", |records| {
        records.iter().any(|r| r.id() == id)
    });
    let ssl: bool = db
        .client
        .query_one(
            "SELECT s.ssl FROM pg_replication_slots r JOIN pg_stat_ssl s ON s.pid = r.active_pid WHERE r.slot_name = $1",
            &[&db.slot],
        )
        .await
        .unwrap_or_else(|e| panic!("no active walsender for the slot: {e}\n{}", relay.log_text()))
        .get(0);
    assert!(ssl, "the replication connection is not encrypted");
    db.wait_all_confirmed().await;
    let status = relay.terminate(Duration::from_secs(15));
    assert!(status.success(), "{}", relay.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_only_server_works_with_verify_full_and_a_password() {
    let server = tls_server();
    let db = tls_db("tlspw", &server.verify_full()).await;
    let (text, output) = run_command(&db, "check", &db.url, &[]);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("[ok  ] SQL connection to localhost:"), "{text}");
    assert!(text.contains("(TLSv1.3) as postgres://postgres@localhost"), "{text}");
    assert!(text.contains("[ok  ] replication connection to localhost:"), "{text}");
    assert!(
        !text.contains(&server.postgres.password),
        "the password leaked:\n{text}"
    );
    publishes_over_tls(&db).await;
    let (text, output) = run_command(&db, "status", &db.url, &["--json"]);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(!text.contains(&server.postgres.password), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_authenticates_setup_check_run_and_status() {
    let server = tls_server();
    let url = format!(
        "postgres://{CERT_USER}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        server.postgres.port,
        server.file("ca.crt"),
        server.file("client.crt"),
        server.file("client.key"),
    );
    let db = tls_db("tlscert", &url).await;
    let (text, output) = run_command(&db, "check", &db.url, &[]);
    assert_eq!(output.status.code(), Some(0), "{text}");
    publishes_over_tls(&db).await;
    let (text, output) = run_command(&db, "status", &db.url, &[]);
    assert_eq!(output.status.code(), Some(0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_failures_name_their_reason() {
    let server = tls_server();
    let db = tls_db("tlsbad", &server.verify_full()).await;
    let wrong_ca = server.password_url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", server.file("other-ca.crt")),
    );
    let (text, output) = run_command(&db, "run", &with_db(&wrong_ca, &db), &[]);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("does not verify: unknown CA"), "{text}");
    let (text, output) = run_command(&db, "check", &with_db(&wrong_ca, &db), &[]);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL] PostgreSQL: ") && text.contains("unknown CA"),
        "{text}"
    );

    let by_address = server.password_url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", server.file("ca.crt")),
    );
    let (text, output) = run_command(&db, "status", &with_db(&by_address, &db), &[]);
    assert_ne!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("name mismatch"), "{text}");
    // verify-ca checks the chain, not the name.
    let chain_only = server.password_url(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", server.file("ca.crt")),
    );
    let (text, output) = run_command(&db, "status", &with_db(&chain_only, &db), &[]);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(!text.contains(&server.postgres.password), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_is_refused_with_the_servers_reason_and_a_hint() {
    let server = tls_server();
    let db = tls_db("tlsplain", &server.verify_full()).await;
    let plain = server.password_url("localhost", "sslmode=disable");
    for subcommand in ["run", "status", "setup"] {
        let (text, output) = run_command(&db, subcommand, &with_db(&plain, &db), &[]);
        assert_ne!(output.status.code(), Some(0), "{subcommand}: {text}");
        assert!(
            text.contains("no encryption"),
            "{subcommand}: PostgreSQL's reason is not quoted:\n{text}"
        );
        assert!(text.contains("set sslmode=require"), "{subcommand}: no hint:\n{text}");
        assert!(
            !text.contains(&server.postgres.password),
            "{subcommand}: the password leaked:\n{text}"
        );
    }
    // allow: plain text first, TLS when the server refuses it.
    let allow = server.password_url("localhost", "sslmode=allow");
    let (text, output) = run_command(&db, "check", &with_db(&allow, &db), &[]);
    assert_eq!(output.status.code(), Some(0), "{text}");
    assert!(
        text.contains("replication connection to localhost") && text.contains("TLSv1.3"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_named() {
    let server = tls_server();
    let expired = server.certificates.with_expired_server();
    let postgres = start_tls_only(&expired);
    let url = format!(
        "postgres://postgres:{}@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        postgres.password,
        postgres.port,
        server.file("ca.crt")
    );
    let output = command().args(["status"]).env("DATABASE_URL", &url).output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("does not verify: expired"), "{text}");
}

/// A PostgreSQL that refuses connections without TLS, serving `certificates`. TLS cases
/// run on Debian's PostgreSQL (built with OpenSSL), whatever `PG_BINDIR` says.
fn start_tls_only(certificates: &devrig::Certificates) -> devrig::Postgres {
    devrig::Postgres::start_configured(&devrig::Options {
        hba: Some(TLS_ONLY_HBA),
        tls: Some(certificates),
        major: Some(devrig::debian_major().unwrap_or_else(|e| panic!("{e}"))),
        ..devrig::Options::default()
    })
    .unwrap_or_else(|e| panic!("cannot start the TLS-only PostgreSQL: {e}"))
}

/// `url` pointed at `db`'s database.
fn with_db(url: &str, db: &TestDb) -> String {
    crate::support::with_database(url, &db.name)
}
