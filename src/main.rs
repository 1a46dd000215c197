//! The `outbox-relay` command: parse the command line, set up logging, run, and turn
//! the outcome into an exit code.

use std::process::ExitCode;

use outbox_relay::app::{self, RelaySettings};
use outbox_relay::config::{Command, LogFormat};
use outbox_relay::error::RelayError;
use outbox_relay::shutdown::{self, ShutdownTrigger};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = outbox_relay::config_file::parse();
    let cli_format = cli.log_format;
    init_logging(cli_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            tracing::error!(error = %error, "outbox-relay failed");
            // A plain last line for people; JSON logs stay JSON for log pipelines.
            if cli_format == LogFormat::Text {
                eprintln!("error: {error}");
            }
            ExitCode::from(error.exit_code())
        }
    }
}

/// Runs a command; `Ok` carries the exit code of a command that judges (status).
async fn execute(command: Command) -> Result<u8, RelayError> {
    match command {
        Command::Setup(args) => {
            reporting(|shutdown| async move { outbox_relay::setup::setup(&args, shutdown).await }).await
        }
        Command::Replay(args) => {
            reporting(|shutdown| async move { outbox_relay::replay::replay(&args, shutdown).await }).await
        }
        Command::Status(args) => {
            let database = args.postgres.database()?;
            let limits = outbox_relay::status::Limits {
                max_lag_bytes: args.max_lag_bytes,
                max_lag: args.max_lag,
            };
            let status =
                outbox_relay::status::status(&database, &args.postgres.slot, &args.postgres.publication, limits)
                    .await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status).unwrap_or_default());
            } else {
                print!("{}", status.render());
            }
            Ok(status.verdict.exit_code())
        }
        Command::Check(args) => {
            let report = outbox_relay::check::check(&args).await;
            print!("{}", report.render());
            Ok(report.exit_code())
        }
        Command::Run(args) => {
            let settings = RelaySettings::from_args(&args)?;
            let (trigger, shutdown) = shutdown::channel();
            let signals = tokio::spawn(forward_signals(trigger));
            // On a worker thread, not block_on's: the stream, the relay loop and the
            // delivery futures then wake each other on the same worker (tokio's LIFO slot)
            // instead of across threads, which at a steady trickle of single-row
            // transactions cost most of the relay's CPU (docs/performance.md).
            let result = match tokio::spawn(app::run(settings, shutdown)).await {
                Ok(result) => result,
                Err(join) => Err(RelayError::Internal(format!("the relay task failed: {join}"))),
            };
            signals.abort();
            result.map(|()| 0)
        }
    }
}

/// Runs a command that reports what it did line by line and stops early (resumable) on
/// SIGINT or SIGTERM: setup (a backfill) and replay.
async fn reporting<F, Fut>(work: F) -> Result<u8, RelayError>
where
    F: FnOnce(shutdown::Shutdown) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<String>, RelayError>>,
{
    let (trigger, shutdown) = shutdown::channel();
    let signals = tokio::spawn(forward_signals(trigger));
    let result = work(shutdown).await;
    signals.abort();
    for line in result? {
        println!("{line}");
    }
    Ok(0)
}

/// Turns the first SIGINT or SIGTERM into the shutdown signal.
async fn forward_signals(trigger: ShutdownTrigger) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the relay cleanly");
            let _ = tokio::signal::ctrl_c().await;
            trigger.trigger();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
    }
    trigger.trigger();
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("OUTBOX_RELAY_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // lapin logs a returned (unroutable) message whole, payload and headers included: the
    // relay says what it needs about it (dead-lettering, with the reason) without the data.
    let filter = match "lapin::returned_messages=error".parse() {
        Ok(quiet) => filter.add_directive(quiet),
        Err(_) => filter,
    };
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
