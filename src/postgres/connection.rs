//! One `DATABASE_URL`, two kinds of connection: an ordinary SQL connection (setup,
//! slot inspection) and a replication connection (the walsender stream).

use std::time::Duration;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, Config, NoTls};

/// The parsed `DATABASE_URL`.
#[derive(Debug, Clone)]
pub struct Database {
    config: Config,
    url_for_display: String,
}

/// The URL cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid database URL {url}: {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

/// Connecting or talking to PostgreSQL failed.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL at {target}: {message}")]
pub struct ConnectError {
    pub target: String,
    pub message: String,
    /// The server refused for a reason that waiting will not fix (authentication,
    /// a missing database, no REPLICATION attribute).
    pub definite: bool,
}

impl Database {
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let url_for_display = redact(url);
        let error = |reason: String| UrlError {
            url: url_for_display.clone(),
            reason,
        };
        let mut config: Config = url.parse().map_err(|e: tokio_postgres::Error| error(e.to_string()))?;
        if config.get_hosts().is_empty() {
            return Err(error("no host given".into()));
        }
        if config.get_user().is_none() {
            return Err(error("no user given".into()));
        }
        if config.get_ssl_mode() == SslMode::Require {
            return Err(error(
                "sslmode=require is not supported yet: connect over a trusted network or a local socket".into(),
            ));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("outbox-relay");
        Ok(Database {
            config,
            url_for_display,
        })
    }

    /// The URL without its password, for messages.
    pub fn display(&self) -> &str {
        &self.url_for_display
    }

    pub fn dbname(&self) -> &str {
        self.config
            .get_dbname()
            .unwrap_or_else(|| self.config.get_user().unwrap_or("postgres"))
    }

    /// An ordinary SQL connection. The connection task ends when the client is dropped.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        let (client, connection) = self.config.connect(NoTls).await.map_err(|e| self.connect_error(&e))?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "control connection closed");
            }
        });
        Ok(client)
    }

    pub fn connect_error(&self, error: &tokio_postgres::Error) -> ConnectError {
        let definite = error.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            // 28xxx: authentication; 3D000: no such database; 42501: privilege.
            code.starts_with("28") || code == "3D000" || code == "42501"
        });
        let message = match error.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => {
                let mut text = error.to_string();
                let mut source = std::error::Error::source(error);
                while let Some(cause) = source {
                    text.push_str(": ");
                    text.push_str(&cause.to_string());
                    source = cause.source();
                }
                text
            }
        };
        ConnectError {
            target: self.url_for_display.clone(),
            message,
            definite,
        }
    }

    /// Settings for the replication connection to `slot`, streaming `publication`.
    pub fn replication_config(&self, slot: &str, publication: &str) -> pgwire_replication::ReplicationConfig {
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(name)) => name.clone(),
            Some(Host::Unix(path)) => path.to_string_lossy().into_owned(),
            None => "localhost".to_owned(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let password = self
            .config
            .get_password()
            .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
            .unwrap_or_default();
        let tls = pgwire_replication::TlsConfig::disabled();
        pgwire_replication::ReplicationConfig::new(
            host,
            self.config.get_user().unwrap_or("postgres"),
            password,
            self.dbname(),
            slot,
            publication,
        )
        .with_port(port)
        .with_tls(tls)
        .with_application_name("outbox-relay")
    }
}

/// Replaces the password in a URL or key=value string with `***`.
fn redact(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        if let Some(at) = rest.find('@') {
            if let Some(colon) = rest[..at].find(':') {
                return format!("{}{}:***{}", &url[..scheme_end + 3], &rest[..colon], &rest[at..]);
            }
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|pair| {
            if pair.starts_with("password=") {
                "password=***"
            } else {
                pair
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An ordinary connection for periodic side work (monitor, cleanup): connected on demand,
/// dropped after a failure and made again at the next use; a failure is logged once until
/// the next success, so a long outage is one line, not one per tick.
pub struct SideConnection {
    database: Database,
    /// Names the work in the log line.
    what: &'static str,
    client: Option<Client>,
    warned: bool,
}

impl SideConnection {
    pub fn new(database: Database, what: &'static str) -> Self {
        SideConnection {
            database,
            what,
            client: None,
            warned: false,
        }
    }

    /// The connection, made now if there is none; `None` while PostgreSQL is unreachable.
    pub async fn client(&mut self) -> Option<&Client> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = self.database.connect().await.ok();
        }
        self.client.as_ref()
    }

    pub fn succeeded(&mut self) {
        self.warned = false;
    }

    /// Logs the first failure after a success and drops the connection.
    pub fn failed(&mut self, error: &tokio_postgres::Error) {
        if !self.warned {
            tracing::warn!(error = %self.database.connect_error(error), "{}: PostgreSQL did not answer; retrying", self.what);
            self.warned = true;
        }
        self.client = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("postgres://relay:s3cret@db:5432/app"),
            "postgres://relay:***@db:5432/app"
        );
        assert_eq!(
            redact("host=db user=relay password=s3cret"),
            "host=db user=relay password=***"
        );
        assert_eq!(redact("postgres://relay@db/app"), "postgres://relay@db/app");
    }

    #[test]
    fn bad_urls_are_explained() {
        let error = Database::parse("postgres://relay:pw@db:notaport/app").err();
        assert!(error.is_some_and(|e| e.to_string().contains("relay:***@db")));
        assert!(Database::parse("not a url at all").is_err());
        assert!(Database::parse("postgres://relay@db/app?sslmode=require").is_err());
    }

    #[test]
    fn replication_settings_follow_the_url() {
        let database = Database::parse("postgres://relay:pw@127.0.0.1:6543/app").unwrap_or_else(|e| panic!("{e}"));
        let config = database.replication_config("slot_a", "pub_a");
        assert_eq!(config.port, 6543);
        assert_eq!(config.database, "app");
        assert_eq!(config.slot, "slot_a");
    }
}
