//! Issue 9, credentials and hosts: a password rotated in the password file while the
//! relay runs is used at the next reconnection; libpq's password file and variables
//! work; a multi-host URL skips a dead host; channel_binding=require is honoured.

use std::time::Duration;

use crate::support::kafka::Consumer;
use crate::support::{eventually, stdout_of_success, TestDb};

/// A login role of the test's own, with `password`; returns its name.
async fn role(db: &TestDb, suffix: &str, password: &str) -> String {
    let role = format!("{}_{suffix}", db.name);
    db.client
        .batch_execute(&format!("CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'"))
        .await
        .unwrap();
    role
}

/// `db.url` as `role`, without a password.
fn url_as(db: &TestDb, role: &str) -> String {
    let rest = db.url.split_once('@').unwrap().1;
    format!("postgres://{role}@{rest}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_rotated_in_its_file_is_used_at_the_next_reconnection() {
    let mut db = TestDb::new("rotate").await;
    let role = role(&db, "rot", "first-secret").await;
    let dir = std::env::temp_dir().join(format!("outbox-relay-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let password_file = dir.join("password");
    std::fs::write(&password_file, "first-secret\n").unwrap();
    db.url = url_as(&db, &role);
    let file = password_file.display().to_string();
    let mut relay = db.relay_with(&["--database-password-file", &file, "--reconnect-backoff-max", "1s"]);

    let first = db.insert_event("order", "order-1", r#"{"n": 1}"#).await;
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "the first event", |r| {
        r.iter().any(|r| r.id() == first)
    });

    // Rotate as a secret manager does: the server first, the mounted file a moment later.
    db.client
        .batch_execute(&format!("ALTER ROLE {role} PASSWORD 'second-secret'"))
        .await
        .unwrap();
    db.client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the relay to meet the old password's rejection",
        || async { relay.log_text().contains("rejected the password").then_some(()) },
    )
    .await;
    assert!(relay.is_running(), "the relay gave up:\n{}", relay.log_text());
    std::fs::write(&password_file, "second-secret\n").unwrap();

    let second = db.insert_event("order", "order-1", r#"{"n": 2}"#).await;
    consumer.read_until(Duration::from_secs(60), "the event after the rotation", |r| {
        r.iter().any(|r| r.id() == second)
    });
    let log = relay.log_text();
    assert!(
        !log.contains("first-secret") && !log.contains("second-secret"),
        "a password leaked:\n{log}"
    );
    let status = relay.terminate(Duration::from_secs(15));
    assert!(status.success(), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libpq_password_sources_and_a_dead_first_host_work() {
    let db = TestDb::new("pgpass").await;
    let role = role(&db, "pass", "pgpass-secret").await;
    let dir = std::env::temp_dir().join(format!("outbox-relay-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let pgpass = dir.join("pgpass");
    std::fs::write(&pgpass, format!("*:*:{}:{role}:pgpass-secret\n", db.name)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();

    let url = url_as(&db, &role);
    let status = |url: &str, env: &[(&str, &str)]| {
        let output = db
            .command("status")
            .env("DATABASE_URL", url)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, text) = status(&url, &[("PGPASSFILE", &pgpass.display().to_string())]);
    assert_eq!(code, Some(0), "PGPASSFILE: {text}");
    let (code, text) = status(&url, &[("PGPASSWORD", "pgpass-secret")]);
    assert_eq!(code, Some(0), "PGPASSWORD: {text}");
    let (code, text) = status(&url, &[("PGPASSWORD", "wrong")]);
    // PostgreSQL refused the role: exit code 6 (ADR 0009).
    assert_eq!(code, Some(6), "{text}");
    assert!(
        text.contains("password authentication failed") && !text.contains("wrong"),
        "{text}"
    );

    // A dead first host: the relay settles on the second, for SQL and replication alike.
    let dead = devrig::free_port().unwrap();
    let (hosts, rest) = db.url.split_once('@').unwrap().1.split_once('/').unwrap();
    let multi =
        format!("postgres://{role}:pgpass-secret@127.0.0.1:{dead},{hosts}/{rest}?target_session_attrs=read-write");
    let output = db.command("check").env("DATABASE_URL", &multi).output().unwrap();
    let text = stdout_of_success(&output, "check with a dead first host");
    assert!(text.contains(&format!("replication connection to {hosts}")), "{text}");
    let mut multi_db = TestDb::new("pgpassrun").await;
    multi_db.url = multi_db.url.replacen('@', &format!("@127.0.0.1:{dead},"), 1);
    let mut relay = multi_db.relay();
    let id = multi_db.insert_event("order", "o-1", "{}").await;
    let mut consumer = Consumer::new(&multi_db.bootstrap_servers, &[multi_db.topic("order")]);
    consumer.read_until(Duration::from_secs(60), "the event through the second host", |r| {
        r.iter().any(|r| r.id() == id)
    });
    assert!(
        relay.terminate(Duration::from_secs(15)).success(),
        "{}",
        relay.log_text()
    );
    let _ = std::fs::remove_dir_all(dir);
    db.drop().await;
    multi_db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_require_fails_where_the_connection_cannot_bind() {
    let db = TestDb::new("chbind").await;
    // The shared server has no TLS, so no SCRAM-SHA-256-PLUS: libpq's rule is to fail.
    let url = format!("{}?channel_binding=require", db.url);
    let output = db.command("status").env("DATABASE_URL", &url).output().unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("channel binding"), "{text}");
    // The replication connection cannot bind at all; run says so instead of going unbound.
    let output = db
        .command("run")
        .env(
            "DATABASE_URL",
            url.replace("channel_binding=require", "channel_binding=require&sslmode=disable"),
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{text}");
    assert!(text.contains("channel binding"), "{text}");
    db.drop().await;
}
