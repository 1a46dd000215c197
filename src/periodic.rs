//! Work beside the stream, repeated at a fixed period on an ordinary connection until
//! shutdown: the monitor (heartbeat, slot and broker samples) and the cleaner
//! (`--retention`). The loop, the connection's life and the logging of outages live here
//! once; each task says only what one tick does.

use std::time::Duration;

use tokio_postgres::Client;

use crate::postgres::connection::{ConnectError, Database};
use crate::shutdown::Shutdown;

/// Whether a periodic task goes on after a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The task cannot do its work any more (a missing privilege): it ends, the relay
    /// goes on.
    Stop,
}

/// One tick's work on the side connection.
pub trait Periodic {
    /// A failure is logged (once per outage), the connection dropped, and the work tried
    /// again at the next tick.
    fn tick(
        &mut self,
        client: &Client,
        shutdown: &mut Shutdown,
    ) -> impl std::future::Future<Output = Result<Flow, tokio_postgres::Error>> + Send;
}

/// Runs `task` every `period` (ticks missed while a tick ran are skipped) until shutdown
/// or until it stops. `what` names the task in log lines.
pub async fn run<T: Periodic>(
    database: Database,
    what: &'static str,
    period: Duration,
    task: &mut T,
    mut shutdown: Shutdown,
) {
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut side = SideConnection::new(database, what);
    loop {
        tokio::select! {
            biased;
            // Shutdown ends the task at once; a tick is never worth waiting for.
            _ = shutdown.wait() => return,
            _ = ticker.tick() => {}
        }
        let Some(client) = side.client().await else {
            continue;
        };
        match task.tick(client, &mut shutdown).await {
            Ok(Flow::Continue) => side.succeeded(),
            Ok(Flow::Stop) => return,
            Err(error) => side.failed(&error),
        }
    }
}

/// An ordinary connection for periodic side work (monitor, cleanup): connected on demand,
/// dropped after a failure and made again at the next use; a failure is logged once until
/// the next success, so a long outage is one line, not one per tick.
struct SideConnection {
    database: Database,
    /// Names the work in the log line.
    what: &'static str,
    client: Option<Client>,
    warned: bool,
}

impl SideConnection {
    fn new(database: Database, what: &'static str) -> Self {
        SideConnection {
            database,
            what,
            client: None,
            warned: false,
        }
    }

    /// The connection, made now if there is none; `None` while PostgreSQL is unreachable.
    async fn client(&mut self) -> Option<&Client> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            match self.database.connect().await {
                Ok(client) => self.client = Some(client),
                Err(error) => {
                    self.warn(&error);
                    self.client = None;
                }
            }
        }
        self.client.as_ref()
    }

    fn succeeded(&mut self) {
        self.warned = false;
    }

    /// Logs the first failure after a success and drops the connection.
    fn failed(&mut self, error: &tokio_postgres::Error) {
        let error = self.database.connect_error(error);
        self.warn(&error);
        self.client = None;
    }

    fn warn(&mut self, error: &ConnectError) {
        if !self.warned {
            tracing::warn!(%error, "{}: PostgreSQL did not answer; retrying", self.what);
            self.warned = true;
        }
    }
}
