//! One connection target, two kinds of connection: ordinary SQL connections (setup,
//! check, status, slot inspection, monitor, cleanup) and the replication connection
//! (the walsender stream). Both are built from the one parsed [`Target`], so they agree
//! on hosts, TLS, credentials and timeouts by construction.
//!
//! With several hosts, a connection tries them in order and settles on the first that
//! accepts it and matches `target_session_attrs`, as libpq does; the replication
//! connection then goes to the host the SQL connection settled on ([`Connected::server`]),
//! so the stream follows a failover the same way the SQL side does.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_postgres::{Client, NoTls};

pub use super::target::UrlError;
use super::target::{ChannelBinding, Host, Server, SessionAttrs, SslMode, Target};
use super::tls;
use crate::error::{io_class, sqlstate_class, Classify, ErrorClass};

/// The parsed database settings.
#[derive(Debug, Clone)]
pub struct Database {
    target: Arc<Target>,
    display: String,
}

/// Connecting or talking to PostgreSQL failed.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL at {target}: {message}")]
pub struct ConnectError {
    pub target: String,
    pub message: String,
    /// Transient (the server or network is in trouble that passes) or fatal
    /// (authentication, TLS verification, a missing database, a missing privilege, a
    /// setting the relay cannot honour): see [`crate::error::sqlstate_class`].
    pub class: ErrorClass,
    /// PostgreSQL's SQLSTATE, when the server answered.
    pub sqlstate: Option<String>,
}

impl Classify for ConnectError {
    fn class(&self) -> ErrorClass {
        self.class
    }
}

impl ConnectError {
    /// The server rejected the password (SQLSTATE 28P01). After the relay has streamed
    /// once this is retried: the secret may be half-way through a rotation.
    pub fn is_authentication_failure(&self) -> bool {
        self.sqlstate.as_deref() == Some(INVALID_PASSWORD)
    }
}

/// An SQL connection and the index (in [`Database::servers`]) of the server it reached.
pub struct Connected {
    pub client: Client,
    pub server: usize,
}

/// Why one server was not used.
struct Refusal {
    server: String,
    message: String,
    class: ErrorClass,
    sqlstate: Option<String>,
}

impl Database {
    /// Reads `url`, with libpq's environment variables of this process.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        Self::new(url, None, &|key| std::env::var(key).ok())
    }

    /// Reads `url` and the password file option, with `env` for libpq's variables.
    pub fn new(
        url: &str,
        password_file: Option<PathBuf>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, UrlError> {
        let target = Target::parse(url, password_file, env)?;
        Ok(Database {
            display: target.display(),
            target: Arc::new(target),
        })
    }

    /// The settings, for callers that report them (check, status).
    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn servers(&self) -> &[Server] {
        &self.target.servers
    }

    /// `host:port` of server `index`, for messages.
    pub fn server_label(&self, index: usize) -> String {
        self.target
            .servers
            .get(index)
            .map(ToString::to_string)
            .unwrap_or_default()
    }

    /// The target as a URL without secrets, for messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    pub fn dbname(&self) -> &str {
        &self.target.dbname
    }

    /// An SQL connection to the first server that accepts it and matches
    /// `target_session_attrs`. The connection task ends when the client is dropped.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        Ok(self.open().await?.client)
    }

    /// As [`connect`](Self::connect), also saying which server answered.
    pub async fn open(&self) -> Result<Connected, ConnectError> {
        let wanted = self.target.session_attrs;
        // prefer-standby: a standby if any answers, else any server (libpq's two passes).
        let passes: &[SessionAttrs] = match wanted {
            SessionAttrs::PreferStandby => &[SessionAttrs::Standby, SessionAttrs::Any],
            _ => std::slice::from_ref(&self.target.session_attrs),
        };
        let mut refusals = Vec::new();
        for &pass in passes {
            for (index, server) in self.target.servers.iter().enumerate() {
                let client = match self.connect_server(index).await {
                    Ok(client) => client,
                    Err(error) => {
                        refusals.push(Refusal {
                            server: server.to_string(),
                            message: error.message,
                            class: error.class,
                            sqlstate: error.sqlstate,
                        });
                        continue;
                    }
                };
                match session_fits(&client, pass).await {
                    Ok(true) => return Ok(Connected { client, server: index }),
                    Ok(false) => refusals.push(Refusal {
                        server: server.to_string(),
                        message: format!(
                            "does not match target_session_attrs={} (a standby waiting for promotion, or a primary when a standby is wanted)",
                            wanted.as_str()
                        ),
                        class: ErrorClass::Transient,
                        sqlstate: None,
                    }),
                    Err(error) => {
                        let error = self.connect_error(&error);
                        refusals.push(Refusal {
                            server: server.to_string(),
                            message: error.message,
                            class: error.class,
                            sqlstate: error.sqlstate,
                        })
                    }
                }
            }
        }
        Err(self.no_server(refusals))
    }

    fn no_server(&self, refusals: Vec<Refusal>) -> ConnectError {
        // Fatal only when every server refused for good: one in trouble that passes
        // (restarting, a standby being promoted) is worth waiting for.
        let fatal = refusals.iter().find(|r| r.class == ErrorClass::Fatal);
        let class = match fatal {
            Some(_) if refusals.iter().all(|r| r.class == ErrorClass::Fatal) => ErrorClass::Fatal,
            _ => ErrorClass::Transient,
        };
        let sqlstate = fatal.and_then(|r| r.sqlstate.clone());
        let message = match refusals.as_slice() {
            [only] if self.target.servers.len() == 1 => only.message.clone(),
            _ => format!(
                "no server could be used: {}",
                refusals
                    .iter()
                    .map(|r| format!("{}: {}", r.server, r.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
        ConnectError {
            target: self.display.clone(),
            message,
            class,
            sqlstate,
        }
    }

    /// An SQL connection to one server, whatever its role (for reading a standby).
    pub async fn connect_server(&self, index: usize) -> Result<Client, ConnectError> {
        let server = self
            .target
            .servers
            .get(index)
            .ok_or_else(|| self.fatal(format!("no server number {index}")))?;
        let password = self.target.password(server).map_err(|e| self.fatal(e.to_string()))?;
        let modes = attempt_modes(self.target.tls.mode, server);
        first_accepted(
            modes,
            |mode| self.connect_with(server, mode, password.as_ref()),
            |error: &ConnectError| requires_tls(&error.message),
        )
        .await
        .unwrap_or_else(|| Err(self.fatal("no connection attempt was made".into())))
    }

    async fn connect_with(
        &self,
        server: &Server,
        mode: SslMode,
        password: Option<&super::secret::Secret>,
    ) -> Result<Client, ConnectError> {
        let target = &self.target;
        let mut config = tokio_postgres::Config::new();
        config
            .user(&target.user)
            .dbname(&target.dbname)
            .application_name(&target.application_name)
            .port(server.port)
            .channel_binding(match target.channel_binding {
                ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
                ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
                ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
            });
        match &server.host {
            Host::Tcp(name) => config.host(name),
            Host::Unix(path) => config.host_path(path),
        };
        if let Some(password) = password {
            config.password(password.expose());
        }
        if let Some(timeout) = target.connect_timeout {
            config.connect_timeout(timeout);
        }
        if let Some(options) = &target.options {
            config.options(options);
        }
        let ssl_mode = match mode {
            _ if server.is_unix() => tokio_postgres::config::SslMode::Disable,
            SslMode::Disable | SslMode::Allow => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
        };
        config.ssl_mode(ssl_mode);
        if ssl_mode == tokio_postgres::config::SslMode::Disable {
            let (client, connection) = config.connect(NoTls).await.map_err(|e| self.connect_error(&e))?;
            tokio::spawn(watch_connection(connection));
            return Ok(client);
        }
        let tls_config = tls::client_config(&target.tls).map_err(|e| self.fatal(e.to_string()))?;
        let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config);
        let (client, connection) = config.connect(connector).await.map_err(|e| self.connect_error(&e))?;
        tokio::spawn(watch_connection(connection));
        Ok(client)
    }

    fn fatal(&self, message: String) -> ConnectError {
        ConnectError {
            target: self.display.clone(),
            message,
            class: ErrorClass::Fatal,
            sqlstate: None,
        }
    }

    /// Says what went wrong, with a hint where PostgreSQL's reason has a known fix.
    pub fn connect_error(&self, error: &tokio_postgres::Error) -> ConnectError {
        let (message, class, sqlstate) = match error.as_db_error() {
            Some(db) => {
                let code = db.code().code();
                let mut message = format!("{} (SQLSTATE {code})", db.message());
                if requires_tls(db.message()) {
                    message.push_str(&format!("; {REQUIRES_TLS_HINT}"));
                }
                (message, sqlstate_class(code), Some(code.to_owned()))
            }
            None => {
                let text = crate::error::chain(error);
                let io_kind = std::iter::successors(std::error::Error::source(error), |e| e.source())
                    .find_map(|e| e.downcast_ref::<std::io::Error>())
                    .map(std::io::Error::kind);
                match tls::explain_certificate_failure(&text) {
                    Some(explained) => (format!("TLS: {explained}"), ErrorClass::Fatal, None),
                    None if text.contains("channel binding") => (text, ErrorClass::Fatal, None),
                    // A closed connection, a timeout, an unreachable host: passing trouble.
                    None => (text, io_kind.map_or(ErrorClass::Transient, io_class), None),
                }
            }
        };
        ConnectError {
            target: self.display.clone(),
            message,
            class,
            sqlstate,
        }
    }

    /// Settings for replication connections to server `index`, streaming `publication`
    /// from `slot`, one per attempt (`sslmode=allow` tries plain text, then TLS). The
    /// password is read now.
    pub fn replication_attempts(
        &self,
        index: usize,
        slot: &str,
        publication: &str,
    ) -> Result<Vec<pgwire_replication::ReplicationConfig>, ConnectError> {
        let target = &self.target;
        let server = target
            .servers
            .get(index)
            .ok_or_else(|| self.fatal(format!("no server number {index}")))?;
        if target.channel_binding == ChannelBinding::Require {
            return Err(self.fatal(CHANNEL_BINDING_UNSUPPORTED.into()));
        }
        let password = target.password(server).map_err(|e| self.fatal(e.to_string()))?;
        attempt_modes(target.tls.mode, server)
            .into_iter()
            .map(|mode| {
                let tls = tls::replication_tls(&target.tls, mode, server).map_err(|e| self.fatal(e.to_string()))?;
                let mut config = pgwire_replication::ReplicationConfig::new(
                    server.host_name(),
                    &target.user,
                    password.as_ref().map(|p| p.expose().to_owned()).unwrap_or_default(),
                    &target.dbname,
                    slot,
                    publication,
                )
                .with_port(server.port)
                .with_tls(tls)
                .with_application_name(&target.application_name);
                if let Some(options) = &target.options {
                    config = config.with_options(options);
                }
                Ok(config)
            })
            .collect()
    }

    /// How long one replication connection attempt may take to reach streaming.
    pub fn connect_timeout(&self) -> Option<std::time::Duration> {
        self.target.connect_timeout
    }
}

/// Why a replication connection cannot honour `channel_binding=require`.
pub const CHANNEL_BINDING_UNSUPPORTED: &str = "channel_binding=require cannot be honoured on the replication connection: its client (pgwire-replication 0.5) authenticates with SCRAM-SHA-256 without channel binding, and the relay will not connect unbound when binding is required. Use channel_binding=prefer with sslmode=verify-full, which authenticates the server by its certificate (docs/adr/0007-one-tls-stack.md)";

/// PostgreSQL's "password authentication failed".
pub const INVALID_PASSWORD: &str = "28P01";

/// The hint for a server that refuses plain text.
pub const REQUIRES_TLS_HINT: &str = "the server accepts only TLS connections: set sslmode=require, or better sslmode=verify-full with sslrootcert=<the server's CA>";

/// PostgreSQL's reason when pg_hba.conf admits this connection only over TLS
/// (`hostnossl ... reject`, or only `hostssl` lines): "... no encryption" since
/// PostgreSQL 14, "... SSL off" before.
pub fn requires_tls(reason: &str) -> bool {
    reason.contains("pg_hba.conf") && (reason.contains("no encryption") || reason.contains("SSL off"))
}

/// The TLS modes to try in order: `allow` tries plain text first, then TLS.
fn attempt_modes(mode: SslMode, server: &Server) -> Vec<SslMode> {
    match mode {
        SslMode::Allow if !server.is_unix() => vec![SslMode::Disable, SslMode::Require],
        mode => vec![mode],
    }
}

/// Tries each attempt in turn and returns the first connection made; `sslmode=allow`
/// makes two (plain text, then TLS), and the second is tried only when the first failed
/// because the server requires TLS (`refused_plain`). `None` when there was no attempt.
pub(super) async fn first_accepted<A, T, E, F, Fut>(
    attempts: Vec<A>,
    mut connect: F,
    refused_plain: impl Fn(&E) -> bool,
) -> Option<Result<T, E>>
where
    F: FnMut(A) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let count = attempts.len();
    let mut last = None;
    for (n, attempt) in attempts.into_iter().enumerate() {
        match connect(attempt).await {
            Err(error) if n + 1 < count && refused_plain(&error) => last = Some(Err(error)),
            done => return Some(done),
        }
    }
    last
}

async fn watch_connection<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(error) = connection.await {
        tracing::debug!(%error, "control connection closed");
    }
}

/// Whether the session matches `wanted`, asked as libpq asks.
async fn session_fits(client: &Client, wanted: SessionAttrs) -> Result<bool, tokio_postgres::Error> {
    if wanted == SessionAttrs::Any {
        return Ok(true);
    }
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'",
            &[],
        )
        .await?;
    let (in_recovery, read_only): (bool, bool) = (row.get(0), row.get(1));
    Ok(match wanted {
        SessionAttrs::Any => true,
        SessionAttrs::ReadWrite => !read_only,
        SessionAttrs::ReadOnly => read_only,
        SessionAttrs::Primary => !in_recovery,
        SessionAttrs::Standby | SessionAttrs::PreferStandby => in_recovery,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(url: &str) -> Database {
        Database::new(url, None, &|_| None).unwrap_or_else(|e| panic!("{e}"))
    }

    fn attempts_for(
        database: &Database,
        server: usize,
        slot: &str,
        publication: &str,
    ) -> Vec<pgwire_replication::ReplicationConfig> {
        database
            .replication_attempts(server, slot, publication)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn replication_settings_follow_the_target() {
        let database = database("postgres://relay:pw@127.0.0.1:6543,db2/app?sslmode=disable&application_name=mine");
        let attempts = attempts_for(&database, 0, "slot_a", "pub_a");
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].port, 6543);
        assert_eq!(attempts[0].database, "app");
        assert_eq!(attempts[0].slot, "slot_a");
        assert_eq!(attempts[0].password, "pw");
        assert_eq!(attempts[0].application_name.as_deref(), Some("mine"));
        let second = attempts_for(&database, 1, "s", "p");
        assert_eq!((second[0].host.as_str(), second[0].port), ("db2", 5432));
    }

    #[test]
    fn allow_tries_plain_text_then_tls() {
        let database = database("postgres://relay:pw@db/app?sslmode=allow");
        let attempts = attempts_for(&database, 0, "s", "p");
        let modes: Vec<_> = attempts.iter().map(|a| a.tls.mode).collect();
        assert_eq!(
            modes,
            [
                pgwire_replication::SslMode::Disable,
                pgwire_replication::SslMode::Require
            ]
        );
        let socket = super::super::target::Server {
            host: Host::Unix("/tmp".into()),
            port: 5432,
        };
        assert_eq!(attempt_modes(SslMode::Allow, &socket), [SslMode::Allow]);
    }

    #[test]
    fn channel_binding_required_is_refused_for_replication_with_a_reason() {
        let database = database("postgres://relay:pw@db/app?channel_binding=require&sslmode=require");
        let error = database
            .replication_attempts(0, "s", "p")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("channel_binding=require cannot be honoured"), "{error}");
        assert!(!error.contains("pw@"), "{error}");
    }

    #[test]
    fn a_server_that_refuses_plain_text_is_recognised() {
        assert!(requires_tls(
            "pg_hba.conf rejects connection for host \"127.0.0.1\", user \"u\", database \"d\", no encryption"
        ));
        assert!(requires_tls(
            "no pg_hba.conf entry for host \"127.0.0.1\", user \"u\", database \"d\", no encryption"
        ));
        assert!(!requires_tls(
            "no pg_hba.conf entry for host \"127.0.0.1\", user \"u\", database \"d\", SSL encryption"
        ));
    }
}
