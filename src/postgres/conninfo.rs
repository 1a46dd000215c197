//! libpq connection strings, read the way libpq reads them: a `postgres://` (or
//! `postgresql://`) URL, or a `key=value` string.
//!
//! One job: turn the text into keyword/value pairs, in order, with nothing dropped or
//! interpreted. A URL's user, password, hosts, ports and database become the keywords
//! `user`, `password`, `host`, `port` and `dbname`; several hosts become one
//! comma-separated `host` (and `port`) value, as libpq's own keyword form writes them.
//! What the keywords mean is [`super::target`]'s business.
//!
//! Errors never quote the text: it may hold a password.

/// Why a connection string cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConninfoError {
    #[error("{0}")]
    Syntax(String),
}

fn syntax(message: impl Into<String>) -> ConninfoError {
    ConninfoError::Syntax(message.into())
}

/// Splits a connection string into keyword/value pairs.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, ConninfoError> {
    let text = text.trim();
    for scheme in ["postgresql://", "postgres://"] {
        if let Some(rest) = text.strip_prefix(scheme) {
            return parse_url(rest);
        }
    }
    if text.contains("://") {
        return Err(syntax("a URL must start with postgres:// or postgresql://"));
    }
    parse_keywords(text)
}

/// `[user[:password]@][host][:port][,host[:port]...][/dbname][?key=value&...]`
fn parse_url(rest: &str) -> Result<Vec<(String, String)>, ConninfoError> {
    let mut pairs = Vec::new();
    let (before_query, query) = match rest.split_once('?') {
        Some((before, query)) => (before, Some(query)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.split_once('/') {
        Some((authority, path)) => (authority, Some(path)),
        None => (before_query, None),
    };
    // The password may itself contain '@' only percent-encoded; the last '@' ends it.
    let hosts = match authority.rsplit_once('@') {
        Some((credentials, hosts)) => {
            let (user, password) = match credentials.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (credentials, None),
            };
            if !user.is_empty() {
                pairs.push(("user".to_owned(), decode(user)?));
            }
            if let Some(password) = password {
                pairs.push(("password".to_owned(), decode(password)?));
            }
            hosts
        }
        None => authority,
    };
    if !hosts.is_empty() {
        let mut names = Vec::new();
        let mut ports = Vec::new();
        for entry in hosts.split(',') {
            let (name, port) = split_host_port(entry)?;
            names.push(decode(name)?);
            ports.push(port.to_owned());
        }
        pairs.push(("host".to_owned(), names.join(",")));
        if ports.iter().any(|p| !p.is_empty()) {
            pairs.push(("port".to_owned(), ports.join(",")));
        }
    }
    if let Some(path) = path.filter(|p| !p.is_empty()) {
        pairs.push(("dbname".to_owned(), decode(path)?));
    }
    for parameter in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (key, value) = parameter
            .split_once('=')
            .ok_or_else(|| syntax(format!("URL parameter {:?} has no value", decode_lossy(parameter))))?;
        pairs.push((decode(key)?, decode(value)?));
    }
    Ok(pairs)
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(entry: &str) -> Result<(&str, &str), ConninfoError> {
    if let Some(inner) = entry.strip_prefix('[') {
        let (address, after) = inner
            .split_once(']')
            .ok_or_else(|| syntax("an IPv6 address in a URL must be closed by ']'"))?;
        return match after {
            "" => Ok((address, "")),
            _ => after
                .strip_prefix(':')
                .map(|port| (address, port))
                .ok_or_else(|| syntax("expected ':' and a port after an IPv6 address")),
        };
    }
    Ok(entry.split_once(':').unwrap_or((entry, "")))
}

/// Percent-decoding, as libpq applies it to every part of a URL.
fn decode(text: &str) -> Result<String, ConninfoError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|pair| std::str::from_utf8(pair).ok())
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                .ok_or_else(|| syntax("invalid percent-encoding in the URL"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| syntax("the URL decodes to invalid UTF-8"))
}

fn decode_lossy(text: &str) -> String {
    decode(text).unwrap_or_else(|_| text.to_owned())
}

/// `key = value key2 = 'quoted value'`; backslash escapes a quote or a backslash.
fn parse_keywords(text: &str) -> Result<Vec<(String, String)>, ConninfoError> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(syntax(format!("missing \"=\" after {key:?} in the connection string")));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.push(chars.next().ok_or_else(|| syntax("unterminated quoted string"))?),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(syntax("unterminated quoted string in the connection string")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn kv(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn a_url_becomes_libpq_keywords() {
        assert_eq!(
            pairs("postgres://relay:s%40cret@db.example.com:6543/app?sslmode=verify-full&sslrootcert=%2Fca.pem"),
            kv(&[
                ("user", "relay"),
                ("password", "s@cret"),
                ("host", "db.example.com"),
                ("port", "6543"),
                ("dbname", "app"),
                ("sslmode", "verify-full"),
                ("sslrootcert", "/ca.pem"),
            ])
        );
    }

    #[test]
    fn several_hosts_keep_their_ports_in_order() {
        assert_eq!(
            pairs("postgresql://u@h1:5432,h2,[::1]:7/d?target_session_attrs=read-write"),
            kv(&[
                ("user", "u"),
                ("host", "h1,h2,::1"),
                ("port", "5432,,7"),
                ("dbname", "d"),
                ("target_session_attrs", "read-write"),
            ])
        );
    }

    #[test]
    fn a_socket_directory_and_bare_urls_parse() {
        assert_eq!(
            pairs("postgres://u@%2Fvar%2Frun%2Fpostgresql/d"),
            kv(&[("user", "u"), ("host", "/var/run/postgresql"), ("dbname", "d")])
        );
        assert_eq!(pairs("postgres://"), kv(&[]));
        assert_eq!(
            pairs("postgres:///d?host=/tmp"),
            kv(&[("dbname", "d"), ("host", "/tmp")])
        );
    }

    #[test]
    fn keyword_strings_honour_quotes_and_escapes() {
        assert_eq!(
            pairs("host=db  port = 5433 options='-c x=\\'y\\''"),
            kv(&[("host", "db"), ("port", "5433"), ("options", "-c x='y'")])
        );
        assert_eq!(
            pairs("host=db password='it\\'s' user=a\\ b"),
            kv(&[("host", "db"), ("password", "it's"), ("user", "a b")])
        );
    }

    #[test]
    fn errors_never_quote_a_password() {
        for bad in [
            "postgres://u:s3cret@h/d?sslmode",
            "postgres://u:s3cret%zz@h/d",
            "host=h password='s3cret",
            "mysql://u:s3cret@h/d",
        ] {
            let error = parse(bad).err().unwrap_or_else(|| panic!("{bad} parsed"));
            assert!(!error.to_string().contains("s3cret"), "{error}");
        }
    }
}
