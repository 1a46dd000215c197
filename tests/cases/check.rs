//! Issue 5, `outbox-relay check` and `--config`: each broken precondition is reported
//! with its fix; a config file is applied with flag > environment > file precedence.

use std::process::Output;

use crate::support::relay::command;
use crate::support::{services, TestDb};

/// Runs `outbox-relay check` against `db` (its URL may be overridden in `extra_env`).
fn check(db: &TestDb, args: &[&str], extra_env: &[(&str, &str)]) -> (String, Output) {
    let output = db
        .command("check")
        .args(args)
        .envs(extra_env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    (stdout, output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_when_run_can_start() {
    let db = TestDb::new("checkok").await;
    let (text, output) = check(&db, &["--retention", "1h"], &[]);
    assert_eq!(output.status.code(), Some(0), "{text}");
    for line in [
        "[ok  ] configuration is valid",
        "[ok  ] wal_level = logical",
        "may stream replication",
        "[ok  ] publication outbox_pub publishes inserts of public.outbox",
        &format!("[ok  ] slot {} (pgoutput)", db.slot),
        "[ok  ] --retention: the role may delete from public.outbox",
        "[ok  ] Kafka reachable",
        &format!("[ok  ] topic {}.dlq exists or was created", db.name),
        "ready: ",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_a_missing_publication_and_a_role_without_replication() {
    let db = TestDb::new("checkbad").await;
    let role = format!("{}_norepl", db.name);
    db.client
        .batch_execute(&format!(
            "DROP PUBLICATION outbox_pub; CREATE ROLE {role} LOGIN PASSWORD 'pw' NOREPLICATION"
        ))
        .await
        .unwrap();
    let rest = db.url.split_once('@').unwrap().1;
    let url = format!("postgres://{role}:pw@{rest}");
    let (text, output) = check(&db, &[], &[("DATABASE_URL", &url)]);
    assert_eq!(output.status.code(), Some(1), "{text}");
    for line in [
        &format!("[FAIL] role {role} lacks the REPLICATION attribute"),
        &format!("fix: as a superuser: ALTER ROLE {role} REPLICATION;"),
        "[FAIL] publication outbox_pub does not exist",
        "fix: create it with sql/002_publication.sql or `outbox-relay setup --apply-sql`",
        "2 problem(s) to fix",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    db.drop().await;
    let admin = crate::support::connect(&services().url_for("postgres")).await;
    admin.batch_execute(&format!("DROP ROLE {role}")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_wal_level_replica_with_its_fix() {
    // A private server: logical decoding is off there.
    let postgres = devrig::Postgres::start_with(&["wal_level = replica"]).unwrap();
    let url = postgres.url("postgres");
    let output = command()
        .args(["check", "--database-url", &url])
        .env("KAFKA_BOOTSTRAP_SERVERS", &services().bootstrap_servers)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(
        text.contains("[FAIL] wal_level = replica: logical decoding needs wal_level = logical\n       fix: ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_is_applied_below_flags_and_environment_and_unknown_keys_are_refused() {
    let db = TestDb::new("configfile").await;
    let dir = std::env::temp_dir().join(format!("outbox-relay-{}", db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("relay.toml");
    let path = file.to_str().unwrap();

    std::fs::write(&file, "slot = \"from_file\"\nmax_in_flight = 100\n").unwrap();
    let slot_named = |text: &str| {
        ["from_file", "from_env", "from_flag"]
            .into_iter()
            .find(|name| text.contains(&format!("slot {name} does not exist")))
            .map(str::to_owned)
    };
    // The test's own OUTBOX_RELAY_SLOT is removed so the file can speak.
    let file_only = command()
        .args(["check", "--config", path])
        .env("DATABASE_URL", &db.url)
        .env("KAFKA_BOOTSTRAP_SERVERS", &db.bootstrap_servers)
        .output()
        .unwrap();
    assert_eq!(
        slot_named(&String::from_utf8_lossy(&file_only.stdout)).as_deref(),
        Some("from_file")
    );
    let (text, _) = check(&db, &["--config", path], &[("OUTBOX_RELAY_SLOT", "from_env")]);
    assert_eq!(slot_named(&text).as_deref(), Some("from_env"), "{text}");
    let (text, _) = check(
        &db,
        &["--config", path, "--slot", "from_flag"],
        &[("OUTBOX_RELAY_SLOT", "from_env")],
    );
    assert_eq!(slot_named(&text).as_deref(), Some("from_flag"), "{text}");

    std::fs::write(&file, "slot = \"s\"\nbootstrap_servrs = \"kafka:9092\"\n").unwrap();
    for args in [vec!["check", "--config", path], vec!["run", "--config", path]] {
        let output = command().args(&args).env("DATABASE_URL", &db.url).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("unknown key `bootstrap_servrs`"), "{stderr}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    db.drop().await;
}
