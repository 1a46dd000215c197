//! Where the database password comes from, read again at every connection attempt so
//! that a rotated secret (a Kubernetes Secret mounted as a file, Vault dynamic
//! credentials, an IAM token refreshed by a sidecar) is picked up without a restart.
//!
//! The order, first match wins: the password in the URL; `--database-password-file`;
//! `PGPASSWORD`; the password file of libpq (`passfile`, `PGPASSFILE` or `~/.pgpass`),
//! matched on host, port, database and user as libpq matches it. A URL password and a
//! password file together are refused when the settings are read: two sources of one
//! secret is a mistake waiting to be rotated half-way.

use std::path::{Path, PathBuf};

use super::secret::Secret;

/// Reading a password source failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PasswordError(String);

/// The password sources of one connection target.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// From the URL (`postgres://user:password@...` or `password=`).
    pub inline: Option<Secret>,
    /// `--database-password-file`: the whole file is the password (one trailing newline
    /// removed).
    pub file: Option<PathBuf>,
    /// `PGPASSWORD`.
    pub environment: Option<Secret>,
    /// libpq's password file: `passfile`, `PGPASSFILE`, or `~/.pgpass`.
    pub passfile: Option<PathBuf>,
}

/// What a `.pgpass` line is matched against.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    /// The host name as written (a socket directory for Unix sockets).
    pub host: &'a str,
    pub port: u16,
    pub dbname: &'a str,
    pub user: &'a str,
}

impl Credentials {
    /// The password for one connection attempt, read now.
    pub fn password(&self, lookup: Lookup<'_>) -> Result<Option<Secret>, PasswordError> {
        if let Some(inline) = &self.inline {
            return Ok(Some(inline.clone()));
        }
        if let Some(path) = &self.file {
            return read_password_file(path).map(Some);
        }
        if let Some(environment) = &self.environment {
            return Ok(Some(environment.clone()));
        }
        Ok(self.passfile.as_deref().and_then(|path| pgpass_lookup(path, lookup)))
    }
}

fn read_password_file(path: &Path) -> Result<Secret, PasswordError> {
    let text = std::fs::read_to_string(path).map_err(|error| {
        PasswordError(format!(
            "cannot read --database-password-file {}: {error}",
            path.display()
        ))
    })?;
    let password = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(PasswordError(format!(
            "--database-password-file {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(password))
}

/// The first matching line of a `.pgpass` file, as libpq finds it; `None` when the file is
/// missing, unreadable, or readable by group or others (libpq ignores such a file, with
/// a warning).
fn pgpass_lookup(path: &Path, lookup: Lookup<'_>) -> Option<Secret> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "password file has group or world access; ignored (as libpq does): chmod 0600 it");
            return None;
        }
    }
    let text = std::fs::read_to_string(path).ok()?;
    pgpass_match(&text, lookup).map(Secret::new)
}

/// Matches `host:port:database:user:password` lines; `*` matches anything, `\` escapes
/// `:` and `\`. libpq matches a Unix socket directory as `localhost`.
pub fn pgpass_match(text: &str, lookup: Lookup<'_>) -> Option<String> {
    let host = if lookup.host.starts_with('/') {
        "localhost"
    } else {
        lookup.host
    };
    let port = lookup.port.to_string();
    let wanted = [host, port.as_str(), lookup.dbname, lookup.user];
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = fields
            .iter()
            .zip(wanted)
            .all(|(field, value)| field == "*" || field == value);
        if matches {
            return fields.get(4).cloned();
        }
    }
    None
}

fn split_pgpass_line(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => field.extend(chars.next()),
            // The fifth field, the password, keeps its colons.
            ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
            _ => field.push(c),
        }
    }
    fields.push(field);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup<'a>(host: &'a str, port: u16, dbname: &'a str, user: &'a str) -> Lookup<'a> {
        Lookup {
            host,
            port,
            dbname,
            user,
        }
    }

    #[test]
    fn pgpass_lines_match_as_libpq_matches_them() {
        let text = "# comment\n\
                    db1:5432:app:relay:first\n\
                    *:5433:*:relay:sec\\:ond\n\
                    localhost:*:*:*:socket\n";
        assert_eq!(
            pgpass_match(text, lookup("db1", 5432, "app", "relay")).as_deref(),
            Some("first")
        );
        assert_eq!(
            pgpass_match(text, lookup("db2", 5433, "x", "relay")).as_deref(),
            Some("sec:ond")
        );
        assert_eq!(
            pgpass_match(text, lookup("/tmp", 5432, "x", "y")).as_deref(),
            Some("socket")
        );
        assert_eq!(pgpass_match(text, lookup("db2", 5432, "x", "relay")), None);
    }

    #[test]
    fn the_password_file_is_read_at_every_attempt() {
        let dir = std::env::temp_dir().join(format!("outbox-relay-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("password");
        let credentials = Credentials {
            file: Some(path.clone()),
            environment: Some(Secret::new("from-env")),
            ..Credentials::default()
        };
        let at = lookup("db", 5432, "app", "relay");
        let read = || credentials.password(at).ok().flatten().map(|s| s.expose().to_owned());
        std::fs::write(&path, "first\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read().as_deref(), Some("first"));
        std::fs::write(&path, "rotated").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read().as_deref(), Some("rotated"));
        std::fs::write(&path, "").unwrap_or_else(|e| panic!("{e}"));
        assert!(credentials.password(at).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
