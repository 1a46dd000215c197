//! Bad settings and missing prerequisites end in a clear message and a non-zero exit.

use std::process::Output;

use crate::support::relay::command;
use crate::support::TestDb;

fn run(args: &[&str], database_url: &str) -> Output {
    let services = crate::support::services();
    command()
        .arg("run")
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", &services.bootstrap_servers)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the relay: {e}"))
}

fn assert_clear_failure(output: &Output, code: i32, says: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(code), "stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    for words in says {
        assert!(stderr.contains(words), "expected {words:?} in:\n{stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_slot_says_to_run_setup() {
    let db = TestDb::new("noslot").await;
    let output = run(&["--slot", "no_such_slot"], &db.url);
    assert_clear_failure(&output, 3, &["no_such_slot", "does not exist", "outbox-relay setup"]);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_publication_is_named() {
    let db = TestDb::new("nopub").await;
    let output = run(&["--slot", &db.slot, "--publication", "no_such_pub"], &db.url);
    assert_clear_failure(&output, 3, &["no_such_pub", "does not exist"]);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_reported() {
    let port = devrig::free_port().unwrap_or_else(|e| panic!("{e}"));
    let url = format!("postgres://postgres:pw@127.0.0.1:{port}/app");
    let output = run(&[], &url);
    assert_clear_failure(&output, 1, &["cannot reach PostgreSQL", &format!("127.0.0.1:{port}")]);
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains(":pw@"),
        "password in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_url_and_a_bad_template_are_configuration_errors() {
    let output = run(&[], "postgres://relay:secret@db:notaport/app");
    assert_clear_failure(&output, 2, &["invalid database URL"]);
    assert!(
        !String::from_utf8_lossy(&output.stderr).contains("secret"),
        "password in the log"
    );

    let db = TestDb::new("badtemplate").await;
    let output = run(&["--slot", &db.slot, "--topic-template", "x.{nope}"], &db.url);
    assert_clear_failure(&output, 2, &["topic template", "{nope}"]);
    let output = run(&["--slot", &db.slot, "--dead-letter-topic", "no spaces"], &db.url);
    assert_clear_failure(&output, 2, &["--dead-letter-topic", "not legal"]);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_is_idempotent_and_reports_what_exists() {
    let db = TestDb::new("setup").await;
    let output = command()
        .args(["setup", "--apply-sql"])
        .env("DATABASE_URL", &db.url)
        .env("OUTBOX_RELAY_SLOT", &db.slot)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(&format!("slot {} exists", db.slot)), "{stdout}");
    assert!(stdout.contains("applied sql/001_outbox_table.sql"), "{stdout}");
    db.drop().await;
}
