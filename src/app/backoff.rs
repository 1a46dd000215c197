//! Waiting between attempts.

use std::time::Duration;

use crate::shutdown::Shutdown;

pub(super) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Capped exponential backoff between reconnection attempts.
pub(super) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(250);

    pub(super) fn new(max: Duration) -> Self {
        Backoff {
            next: Self::FIRST.min(max),
            max,
        }
    }

    pub(super) fn reset(&mut self) {
        self.next = Self::FIRST.min(self.max);
    }

    /// Sleeps for the current delay (cut short by shutdown) and doubles it.
    pub(super) async fn wait(&mut self, shutdown: &mut Shutdown) {
        tokio::select! {
            biased;
            _ = shutdown.wait() => {}
            _ = tokio::time::sleep(self.next) => {}
        }
        self.next = (self.next * 2).min(self.max);
    }
}
