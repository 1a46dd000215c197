//! The shutdown signal, a value handed to every long-running task (no global flag).

use tokio::sync::watch;

/// Fires the signal; held by whoever listens for SIGINT/SIGTERM.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

/// Observes the signal. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (sender, receiver) = watch::channel(false);
    (ShutdownTrigger(sender), Shutdown(receiver))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the signal has fired (at once if it already has).
    /// Cancel-safe.
    pub async fn wait(&mut self) {
        // An error means the trigger was dropped: nobody can ask for shutdown any more,
        // so treat it as asked.
        let _ = self.0.wait_for(|fired| *fired).await;
    }
}
