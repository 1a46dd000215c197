//! The `outbox-relay` command: parse the command line, set up logging, run, and turn
//! the outcome into an exit code.

use std::process::ExitCode;

use clap::Parser;
use outbox_relay::app::{self, RelaySettings};
use outbox_relay::config::{Cli, Command, LogFormat};
use outbox_relay::error::RelayError;
use outbox_relay::shutdown::{self, ShutdownTrigger};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error, "outbox-relay failed");
            eprintln!("error: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

async fn execute(command: Command) -> Result<(), RelayError> {
    match command {
        Command::Setup(args) => {
            for line in outbox_relay::setup::setup(&args).await? {
                println!("{line}");
            }
            Ok(())
        }
        Command::Run(args) => {
            let settings = RelaySettings::from_args(&args)?;
            let (trigger, shutdown) = shutdown::channel();
            let signals = tokio::spawn(forward_signals(trigger));
            let result = app::run(settings, shutdown).await;
            signals.abort();
            result
        }
    }
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
