//! Issue 9, PostgreSQL 14 to 18: `setup`, `check`, `run` and `status` on each major. The
//! whole suite runs on Debian's PostgreSQL (15); this case runs on 18 by default and on
//! every major listed in `TEST_PG_MAJORS` (`scripts/install-deps` installs
//! them). `PG_BINDIR=<that major's bin directory> scripts/test` runs the whole suite on it.

use std::time::Duration;

use crate::support::kafka::Consumer;
use crate::support::{stdout_of_success, TestDb};

fn majors() -> Vec<u32> {
    let mut majors = vec![18];
    if let Ok(list) = std::env::var("TEST_PG_MAJORS") {
        majors.extend(list.split(',').filter_map(|m| m.trim().parse::<u32>().ok()));
    }
    majors.sort_unstable();
    majors.dedup();
    majors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_check_run_and_status_work_on_each_major() {
    for major in majors() {
        core_path(major).await;
    }
}

async fn core_path(major: u32) {
    let postgres = devrig::Postgres::start_configured(&devrig::Options {
        major: Some(major),
        ..devrig::Options::default()
    })
    .unwrap_or_else(|e| panic!("cannot start PostgreSQL {major}: {e}"));
    assert_eq!(postgres.major().unwrap(), major);
    let db = TestDb::on(
        &postgres,
        &crate::support::services().bootstrap_servers,
        &format!("v{major}"),
    )
    .await;
    let output = db.command("check").output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "PostgreSQL {major}: {text}");
    let failover_line = if major >= 17 {
        format!("[ok  ] slot {} is failover-enabled", db.slot)
    } else {
        format!("[warn] PostgreSQL {major} has no failover slots")
    };
    assert!(text.contains(&failover_line), "PostgreSQL {major}: {text}");

    let mut relay = db.relay();
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            db.insert_event("order", &format!("o-{}", n % 3), &format!(r#"{{"n": {n}}}"#))
                .await,
        );
    }
    let mut consumer = Consumer::new(&db.bootstrap_servers, &[db.topic("order")]);
    consumer.read_until(
        Duration::from_secs(60),
        &format!("20 events from PostgreSQL {major}"),
        |records| ids.iter().all(|id| records.iter().any(|r| &r.id() == id)),
    );
    db.wait_all_confirmed().await;
    assert!(
        relay.terminate(Duration::from_secs(15)).success(),
        "{}",
        relay.log_text()
    );
    let output = db.command("status").args(["--json"]).output().unwrap();
    let text = stdout_of_success(&output, &format!("status on PostgreSQL {major}"));
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["failover"]["server_major"], major);
    println!("PostgreSQL {major}: setup, check, run (20 events) and status work");
}
