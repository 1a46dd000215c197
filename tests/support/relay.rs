//! The relay as a process, as users run it: started, signalled, killed, its log read.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::TestDb;

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_outbox-relay")
}

/// A command for the relay binary with a clean environment for its own settings.
pub fn command() -> Command {
    let mut command = Command::new(binary());
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_RELAY_")
            || key.starts_with("PG")
            || key == "DATABASE_URL"
            || key == "DATABASE_PASSWORD_FILE"
            || key == "KAFKA_BOOTSTRAP_SERVERS"
            || key == "AMQP_URL"
        {
            command.env_remove(key);
        }
    }
    command.env("OUTBOX_RELAY_LOG", "info,outbox_relay=debug");
    // Relays run side by side: each takes a free port for its operations endpoint.
    command.env("OUTBOX_RELAY_METRICS_ADDR", "127.0.0.1:0");
    command
}

pub struct Relay {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Relay {
    pub fn start(db: &TestDb, extra_args: &[&str]) -> Relay {
        Self::start_with_servers(db, &db.bootstrap_servers, extra_args)
    }

    pub fn start_with_servers(db: &TestDb, bootstrap_servers: &str, extra_args: &[&str]) -> Relay {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!("outbox-relay-test-{}-{}-{n}.log", db.name, std::process::id()));
        let file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let child = command()
            .arg("run")
            .args(extra_args)
            .env("DATABASE_URL", &db.url)
            .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap_servers)
            .env("OUTBOX_RELAY_SLOT", &db.slot)
            .env("OUTBOX_RELAY_PUBLICATION", &db.publication)
            .env("OUTBOX_RELAY_TOPIC_TEMPLATE", &db.topic_template)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the relay: {e}"));
        Relay {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|line| line.starts_with("VmHWM:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse().ok())
    }

    /// SIGKILL: no chance to confirm anything.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(child) = &self.child {
            devrig::kill(child.id(), libc_sigterm());
        }
        self.wait_exit(timeout)
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let Some(child) = self.child.as_mut() else {
            panic!("the relay was already stopped");
        };
        loop {
            if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                panic!("the relay did not exit within {timeout:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The operations endpoint's address, from the relay's log (waits until it is there).
    pub fn metrics_addr(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log_text();
            if let Some(line) = log.lines().find(|l| l.contains("operations endpoint listening")) {
                if let Some(address) = line
                    .split("address=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                {
                    return address.to_owned();
                }
            }
            assert!(Instant::now() < deadline, "no operations endpoint in the log:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET `path` from the operations endpoint: status code and body.
    pub fn get(&self, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(self.metrics_addr()).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: relay\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, body)| body.to_owned());
        (status, body)
    }

    /// The value of a metric from /metrics (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.get("/metrics").1, name).unwrap_or(0.0)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

/// The value of a metric in Prometheus text: unlabelled, or the first series of `name`
/// whatever its labels (`sink="kafka"`).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|line| {
            let series = line.split_whitespace().next().unwrap_or_default();
            series == name || series.split_once('{').is_some_and(|(metric, _)| metric == name)
        })
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
}

fn libc_sigterm() -> i32 {
    15
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill_hard();
    }
}
