//! The connection target: every database setting, read once from the connection string
//! and libpq's environment variables into one value. Both the SQL connections and the
//! replication connection are built from it, so they can never disagree on a host, a
//! TLS setting or a credential.
//!
//! Keywords and their environment variables are libpq's: `host` (`PGHOST`), `port`
//! (`PGPORT`), `user` (`PGUSER`), `dbname` (`PGDATABASE`), `password` (`PGPASSWORD`),
//! `passfile` (`PGPASSFILE`), `sslmode` (`PGSSLMODE`, default `prefer`), `sslrootcert`
//! (`PGSSLROOTCERT`; a file, or `system`), `sslcert` / `sslkey` (`PGSSLCERT` /
//! `PGSSLKEY`), `channel_binding` (`PGCHANNELBINDING`), `connect_timeout`
//! (`PGCONNECT_TIMEOUT`), `application_name` (`PGAPPNAME`), `options` (`PGOPTIONS`),
//! `target_session_attrs` (`PGTARGETSESSIONATTRS`). A keyword in the string beats its
//! environment variable. A keyword the relay cannot honour is refused by name, never
//! ignored: a silently dropped `sslmode` is how plain text reaches a production database.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::conninfo;
use super::password::{Credentials, Lookup, PasswordError};
use super::secret::Secret;

/// The application name PostgreSQL shows for the relay's sessions unless one is given.
pub const APPLICATION_NAME: &str = "outbox-relay";

/// Connect timeout per host when none is given (libpq waits forever; a relay should not).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Tcp(String),
    /// A directory holding the server's Unix socket.
    Unix(PathBuf),
}

/// One host and port of the target, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: Host,
    pub port: u16,
}

impl Server {
    /// The host as written, for `.pgpass` matching and certificate names.
    pub fn host_name(&self) -> String {
        match &self.host {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.to_string_lossy().into_owned(),
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self.host, Host::Unix(_))
    }
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Tcp(name) if name.contains(':') => write!(f, "[{name}]:{}", self.port),
            Host::Tcp(name) => write!(f, "{name}:{}", self.port),
            Host::Unix(path) => write!(f, "{}:{}", path.display(), self.port),
        }
    }
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    /// Plain first; TLS only if the server refuses plain text.
    Allow,
    /// TLS first; plain text if the server does not offer TLS. Nothing is verified.
    Prefer,
    /// TLS or fail; the certificate is not verified (unless a root certificate is given,
    /// then as `verify-ca`, as libpq does).
    Require,
    /// TLS, the certificate chain verified against the root certificates.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }
}

/// Where the certificates that may sign the server's certificate come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// The operating system's trust store (`sslrootcert=system`).
    System,
}

/// A client certificate and its key, for `cert` authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Everything about TLS, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// `None`: libpq's default file `~/.postgresql/root.crt`, needed only when verifying.
    pub root_cert: Option<RootCert>,
    pub client_cert: Option<ClientCert>,
}

impl TlsSettings {
    /// How the certificate is checked: `require` with a root certificate given verifies
    /// the chain, as libpq does.
    pub fn verification(&self) -> Verification {
        match self.mode {
            SslMode::VerifyFull => Verification::Full,
            SslMode::VerifyCa => Verification::Chain,
            SslMode::Require if self.root_cert.is_some() => Verification::Chain,
            _ => Verification::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    None,
    Chain,
    Full,
}

/// libpq's `channel_binding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    Disable,
    Prefer,
    Require,
}

/// libpq's `target_session_attrs`: which of several hosts to settle on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionAttrs {
    Any,
    ReadWrite,
    ReadOnly,
    Primary,
    Standby,
    PreferStandby,
}

impl SessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        }
    }
}

/// The settings cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid database URL {url}: {reason}")]
pub struct UrlError {
    /// The URL without secrets.
    pub url: String,
    pub reason: String,
}

/// The parsed connection target.
#[derive(Debug, Clone)]
pub struct Target {
    pub servers: Vec<Server>,
    pub user: String,
    pub dbname: String,
    pub credentials: Credentials,
    pub tls: TlsSettings,
    pub channel_binding: ChannelBinding,
    /// Per host; `None` waits as long as the operating system does.
    pub connect_timeout: Option<Duration>,
    pub application_name: String,
    pub options: Option<String>,
    pub session_attrs: SessionAttrs,
}

/// Keywords read and honoured.
const HONOURED: [&str; 16] = [
    "host",
    "port",
    "user",
    "dbname",
    "password",
    "passfile",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslpassword",
    "channel_binding",
    "connect_timeout",
    "application_name",
    "options",
    "target_session_attrs",
];

/// Keywords accepted because their libpq meaning is what the relay does anyway.
const HARMLESS: [&str; 8] = [
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "sslsni",
    "sslcompression",
    "client_encoding",
];

impl Target {
    /// Reads `url` (a URL or a `key=value` string), filling what it leaves out from
    /// libpq's environment variables through `env`.
    pub fn parse(
        url: &str,
        password_file: Option<PathBuf>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Target, UrlError> {
        let shown = redact(url);
        let fail = |reason: String| UrlError {
            url: shown.clone(),
            reason,
        };
        let pairs = conninfo::parse(url).map_err(|e| fail(e.to_string()))?;
        let mut given = std::collections::HashMap::new();
        for (key, value) in pairs {
            check_keyword(&key, &value).map_err(&fail)?;
            given.insert(key, value);
        }
        let get = |key: &str, variable: &str| -> Option<String> {
            given
                .get(key)
                .cloned()
                .or_else(|| env(variable))
                .filter(|v| !v.is_empty())
        };

        let servers = servers(get("host", "PGHOST"), get("port", "PGPORT")).map_err(&fail)?;
        let user = get("user", "PGUSER").ok_or_else(|| fail("no user given (user in the URL, or PGUSER)".into()))?;
        let dbname = get("dbname", "PGDATABASE").unwrap_or_else(|| user.clone());

        let inline = given.get("password").filter(|p| !p.is_empty()).map(Secret::new);
        if inline.is_some() && password_file.is_some() {
            return Err(fail(
                "a password is given both in the URL and by --database-password-file; keep one".into(),
            ));
        }
        let passfile = get("passfile", "PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|home| PathBuf::from(home).join(".pgpass")));
        let credentials = Credentials {
            inline,
            file: password_file,
            environment: env("PGPASSWORD").filter(|p| !p.is_empty()).map(Secret::new),
            passfile,
        };

        let tls = tls_settings(&get, env).map_err(&fail)?;
        if given.get("sslpassword").is_some_and(|p| !p.is_empty()) {
            return Err(fail(
                "sslpassword (an encrypted client key) is not supported: decrypt the key \
                 (openssl pkey -in client.key -out client.plain.key), keep it readable only by the relay, and drop sslpassword"
                    .into(),
            ));
        }
        let channel_binding = match get("channel_binding", "PGCHANNELBINDING").as_deref() {
            None | Some("prefer") => ChannelBinding::Prefer,
            Some("disable") => ChannelBinding::Disable,
            Some("require") => ChannelBinding::Require,
            Some(other) => return Err(fail(format!("channel_binding={other}: use disable, prefer or require"))),
        };
        let connect_timeout = match get("connect_timeout", "PGCONNECT_TIMEOUT") {
            None => Some(DEFAULT_CONNECT_TIMEOUT),
            Some(text) => match text.trim().parse::<i64>() {
                Ok(seconds) if seconds <= 0 => None,
                // libpq waits at least 2 s.
                Ok(seconds) => Some(Duration::from_secs(seconds.max(2) as u64)),
                Err(_) => return Err(fail(format!("connect_timeout={text}: give whole seconds"))),
            },
        };
        let session_attrs = match get("target_session_attrs", "PGTARGETSESSIONATTRS").as_deref() {
            None | Some("any") => SessionAttrs::Any,
            Some("read-write") => SessionAttrs::ReadWrite,
            Some("read-only") => SessionAttrs::ReadOnly,
            Some("primary") => SessionAttrs::Primary,
            Some("standby") => SessionAttrs::Standby,
            Some("prefer-standby") => SessionAttrs::PreferStandby,
            Some(other) => {
                return Err(fail(format!(
                    "target_session_attrs={other}: use any, read-write, read-only, primary, standby or prefer-standby"
                )))
            }
        };
        Ok(Target {
            servers,
            user,
            dbname,
            credentials,
            tls,
            channel_binding,
            connect_timeout,
            application_name: get("application_name", "PGAPPNAME").unwrap_or_else(|| APPLICATION_NAME.to_owned()),
            options: get("options", "PGOPTIONS"),
            session_attrs,
        })
    }

    /// The password for a connection to `server`, read now (see [`super::password`]).
    pub fn password(&self, server: &Server) -> Result<Option<Secret>, PasswordError> {
        self.credentials.password(Lookup {
            host: &server.host_name(),
            port: server.port,
            dbname: &self.dbname,
            user: &self.user,
        })
    }

    /// The target as a URL without any secret, for messages and `status`.
    pub fn display(&self) -> String {
        let hosts: Vec<String> = self
            .servers
            .iter()
            .map(|server| match &server.host {
                Host::Unix(path) => format!("{}:{}", path.display().to_string().replace('/', "%2F"), server.port),
                Host::Tcp(_) => server.to_string(),
            })
            .collect();
        let mut text = format!("postgres://{}@{}/{}", self.user, hosts.join(","), self.dbname);
        let mut parameters = vec![format!("sslmode={}", self.tls.mode.as_str())];
        if self.session_attrs != SessionAttrs::Any {
            parameters.push(format!("target_session_attrs={}", self.session_attrs.as_str()));
        }
        text.push('?');
        text.push_str(&parameters.join("&"));
        text
    }
}

fn check_keyword(key: &str, value: &str) -> Result<(), String> {
    if HONOURED.contains(&key) || HARMLESS.contains(&key) {
        return Ok(());
    }
    match (key, value) {
        ("gssencmode", "disable" | "prefer") | ("sslnegotiation", "postgres") | ("load_balance_hosts", "disable") => {
            Ok(())
        }
        ("replication", _) => Err("replication= is set by the relay itself where it is needed; remove it".into()),
        ("hostaddr", _) => Err("hostaddr is not supported: give the address as host".into()),
        ("service", _) => Err("service (pg_service.conf) is not supported: give the settings in the URL".into()),
        // The value is not quoted: a misspelt `password` would print the password.
        _ => Err(format!(
            "the connection option {key:?} is not supported by outbox-relay"
        )),
    }
}

fn servers(hosts: Option<String>, ports: Option<String>) -> Result<Vec<Server>, String> {
    let hosts = hosts.ok_or_else(|| "no host given (host in the URL, or PGHOST)".to_owned())?;
    let hosts: Vec<&str> = hosts.split(',').map(str::trim).collect();
    let ports: Vec<&str> = match &ports {
        Some(ports) => ports.split(',').map(str::trim).collect(),
        None => vec![""],
    };
    if ports.len() != 1 && ports.len() != hosts.len() {
        return Err(format!(
            "{} hosts but {} ports: give one port for all or one per host",
            hosts.len(),
            ports.len()
        ));
    }
    hosts
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port_text = ports.get(i).or(ports.first()).copied().unwrap_or("");
            let port = match port_text {
                "" => 5432,
                text => text.parse().map_err(|_| format!("invalid port {text:?}"))?,
            };
            let host = match *host {
                "" => return Err("an empty host in the host list".to_owned()),
                path if path.starts_with('/') => Host::Unix(PathBuf::from(path)),
                name => Host::Tcp(name.to_owned()),
            };
            Ok(Server { host, port })
        })
        .collect()
}

fn tls_settings(
    get: &dyn Fn(&str, &str) -> Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<TlsSettings, String> {
    let root_cert = get("sslrootcert", "PGSSLROOTCERT").map(|text| match text.as_str() {
        "system" => RootCert::System,
        path => RootCert::File(PathBuf::from(path)),
    });
    let mode = match get("sslmode", "PGSSLMODE") {
        // libpq: with the system trust store, verify-full is the default and the only mode.
        None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
        None => SslMode::Prefer,
        Some(text) => SslMode::parse(&text)
            .ok_or_else(|| format!("sslmode={text}: use disable, allow, prefer, require, verify-ca or verify-full"))?,
    };
    if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
        return Err(format!(
            "sslmode={} cannot be used with sslrootcert=system: use sslmode=verify-full (as libpq requires)",
            mode.as_str()
        ));
    }
    let home_file = |name: &str| env("HOME").map(|home| PathBuf::from(home).join(".postgresql").join(name));
    let root_cert = match root_cert {
        Some(root) => Some(root),
        // libpq's default root certificate, needed only when verifying.
        None if mode >= SslMode::VerifyCa => Some(RootCert::File(
            home_file("root.crt").ok_or("sslmode verifies the server's certificate: give sslrootcert")?,
        )),
        None => None,
    };
    let cert = get("sslcert", "PGSSLCERT").map(PathBuf::from);
    let key = get("sslkey", "PGSSLKEY").map(PathBuf::from);
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) => Some(ClientCert { cert, key }),
        (Some(_), None) | (None, Some(_)) => return Err("sslcert and sslkey go together: give both".into()),
        // libpq's default client certificate, used when both files exist.
        (None, None) => match (home_file("postgresql.crt"), home_file("postgresql.key")) {
            (Some(cert), Some(key)) if cert.exists() && key.exists() => Some(ClientCert { cert, key }),
            _ => None,
        },
    };
    Ok(TlsSettings {
        mode,
        root_cert,
        client_cert,
    })
}

/// Whether a keyword's value may appear in a message: the honoured and harmless ones,
/// except the secrets. An unknown keyword may be a misspelt `password`, so its value is
/// never shown.
fn value_shown(key: &str) -> bool {
    (HONOURED.contains(&key) || HARMLESS.contains(&key) || matches!(key, "gssencmode" | "sslnegotiation"))
        && !matches!(key, "password" | "sslpassword")
}

fn masked(key: &str, value: &str) -> String {
    if value_shown(key) {
        format!("{key}={value}")
    } else {
        format!("{key}=***")
    }
}

/// A copy of a connection string for messages about one that could not be used: the
/// password and every value not known to be harmless are `***`.
pub fn redact(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let (before_query, query) = match url.split_once('?') {
            Some((before, query)) => (before, Some(query)),
            None => (url, None),
        };
        let rest = &before_query[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let mut text = match rest[..authority_end].rfind('@') {
            Some(at) => match rest[..at].find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme_end + 3], &rest[..colon], &rest[at..]),
                None => before_query.to_owned(),
            },
            None => before_query.to_owned(),
        };
        if let Some(query) = query {
            let parameters: Vec<String> = query
                .split('&')
                .map(|parameter| match parameter.split_once('=') {
                    Some((key, value)) => masked(key, value),
                    None => "***".to_owned(),
                })
                .collect();
            text.push('?');
            text.push_str(&parameters.join("&"));
        }
        return text;
    }
    match conninfo::parse(url) {
        Ok(pairs) => pairs
            .iter()
            .map(|(key, value)| masked(key, value))
            .collect::<Vec<_>>()
            .join(" "),
        // Unreadable: the words cannot be trusted to split where values end.
        Err(_) => url
            .split_whitespace()
            .map(|word| match word.split_once('=') {
                Some((key, _)) => format!("{key}=***"),
                None => "***".to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |key| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| (*v).to_owned())
    }

    fn parse(url: &str, env: &[(&'static str, &'static str)]) -> Result<Target, UrlError> {
        let env: &'static [(&'static str, &'static str)] = Box::leak(env.to_vec().into_boxed_slice());
        Target::parse(url, None, &env_of(env))
    }

    fn ok(url: &str, env: &[(&'static str, &'static str)]) -> Target {
        parse(url, env).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_url_beats_the_environment_which_beats_the_defaults() {
        let target = ok(
            "postgres://relay@db:6543/app?sslmode=require",
            &[("PGSSLMODE", "disable"), ("PGAPPNAME", "mine"), ("PGHOST", "other")],
        );
        assert_eq!(
            target.servers,
            vec![Server {
                host: Host::Tcp("db".into()),
                port: 6543
            }]
        );
        assert_eq!(target.tls.mode, SslMode::Require);
        assert_eq!(target.application_name, "mine");
        assert_eq!(target.connect_timeout, Some(DEFAULT_CONNECT_TIMEOUT));
        let from_env = ok("", &[("PGHOST", "h1,h2"), ("PGPORT", "1,2"), ("PGUSER", "u")]);
        assert_eq!(from_env.servers.len(), 2);
        assert_eq!(from_env.servers[1].port, 2);
        assert_eq!(from_env.dbname, "u");
        assert_eq!(from_env.tls.mode, SslMode::Prefer, "libpq's default");
        assert_eq!(from_env.application_name, APPLICATION_NAME);
    }

    #[test]
    fn several_hosts_and_session_attributes() {
        let target = ok(
            "postgres://u@a:1,b,%2Ftmp%2Fsock:3/d?target_session_attrs=read-write",
            &[],
        );
        assert_eq!(
            target.servers.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["a:1", "b:5432", "/tmp/sock:3"]
        );
        assert!(target.servers[2].is_unix());
        assert_eq!(target.session_attrs, SessionAttrs::ReadWrite);
        assert!(parse("host=a,b,c port=1,2 user=u", &[]).is_err());
    }

    #[test]
    fn tls_settings_follow_libpq() {
        let target = ok(
            "postgres://u@h/d?sslmode=verify-full&sslrootcert=/ca.pem&sslcert=/c&sslkey=/k",
            &[],
        );
        assert_eq!(target.tls.verification(), Verification::Full);
        assert_eq!(target.tls.root_cert, Some(RootCert::File("/ca.pem".into())));
        assert!(target.tls.client_cert.is_some());
        let system = ok("postgres://u@h/d?sslrootcert=system", &[]);
        assert_eq!(system.tls.mode, SslMode::VerifyFull);
        assert!(parse("postgres://u@h/d?sslrootcert=system&sslmode=require", &[]).is_err());
        let require_with_root = ok("postgres://u@h/d?sslmode=require&sslrootcert=/ca.pem", &[]);
        assert_eq!(require_with_root.tls.verification(), Verification::Chain);
        let default_root = ok("postgres://u@h/d?sslmode=verify-ca", &[("HOME", "/home/r")]);
        assert_eq!(
            default_root.tls.root_cert,
            Some(RootCert::File("/home/r/.postgresql/root.crt".into()))
        );
        assert!(parse("postgres://u@h/d?sslcert=/c", &[]).is_err());
        assert!(parse("postgres://u@h/d?sslmode=verify", &[]).is_err());
    }

    #[test]
    fn unknown_or_unsupported_options_are_refused_by_name() {
        for (url, word) in [
            ("postgres://u@h/d?sslmdoe=require", "sslmdoe"),
            ("postgres://u@h/d?hostaddr=1.2.3.4", "hostaddr"),
            ("postgres://u@h/d?gssencmode=require", "gssencmode"),
            ("postgres://u:pw@h/d?sslpassword=x", "sslpassword"),
        ] {
            let error = parse(url, &[]).err().unwrap_or_else(|| panic!("{url} parsed"));
            assert!(error.to_string().contains(word), "{error}");
        }
        assert!(ok("host=h user=u keepalives=1 gssencmode=disable", &[]).servers.len() == 1);
    }

    #[test]
    fn passwords_never_reach_messages_or_the_display() {
        let target = ok(
            "postgres://relay:s3cret@db/app?sslmode=verify-full&sslrootcert=/ca",
            &[],
        );
        assert!(!target.display().contains("s3cret"));
        assert!(!format!("{target:?}").contains("s3cret"));
        assert_eq!(target.display(), "postgres://relay@db:5432/app?sslmode=verify-full");
        assert_eq!(
            redact("postgres://relay:s3cret@db:5432/app"),
            "postgres://relay:***@db:5432/app"
        );
        assert_eq!(
            redact("postgres://relay@db/app?password=s3cret&x=1"),
            "postgres://relay@db/app?password=***&x=***"
        );
        assert_eq!(
            redact("host=db user=relay password=s3cret"),
            "host=db user=relay password=***"
        );
        let error = parse("postgres://relay:s3cret@db:notaport/app", &[])
            .err()
            .map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("relay:***@db") && !e.contains("s3cret")),
            "{error:?}"
        );
        assert!(Target::parse("postgres://u:pw@h/d", Some("/pw".into()), &|_| None).is_err());
        let typo = parse("host=h user=u pasword=s3cret", &[])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(typo.contains("pasword") && !typo.contains("s3cret"), "{typo}");
    }

    proptest::proptest! {
        /// Any text, however malformed, is read or refused with a message: never a panic.
        #[test]
        fn any_text_is_read_or_refused(text in ".{0,80}") {
            let _ = Target::parse(&text, None, &|_| None);
            let _ = Target::parse(&format!("postgres://{text}"), None, &|_| None);
        }
    }
}
