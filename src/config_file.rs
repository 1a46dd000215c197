//! `--config relay.toml`: every flag can also be set in a TOML file.
//!
//! A key is a flag's long name with `_` or `-` (`database_url`, `topic-template`); a
//! repeatable flag takes an array (`kafka_property = ["linger.ms=5"]`). One file serves
//! every subcommand: a key another subcommand uses is ignored by this one, and a key no
//! subcommand knows is refused with its name, so a typo never passes unnoticed.
//!
//! Precedence is flag > environment variable > file > built-in default. Clap already
//! ranks flags over environment variables over defaults, so the file's values become
//! the defaults of the command before it parses.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{ArgMatches, CommandFactory, FromArgMatches};

use crate::config::Cli;

/// The flag and environment variable that name the file.
pub const FLAG: &str = "config";
pub const ENV: &str = "OUTBOX_RELAY_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}: unknown key `{key}` (keys are flag names, e.g. database_url, bootstrap_servers, topic_template; see `outbox-relay run --help`)")]
    UnknownKey { path: PathBuf, key: String },
    #[error("config file {path}: key `{key}` must be a string, number, boolean or an array of them")]
    BadValue { path: PathBuf, key: String },
}

/// Parses the command line, with the config file's values as defaults. Exits like clap
/// (code 2, usage on stderr) on a bad command line or a bad file.
pub fn parse() -> Cli {
    let args: Vec<OsString> = std::env::args_os().collect();
    let file = file_named(&args).or_else(|| std::env::var_os(ENV).map(PathBuf::from));
    let mut command = Cli::command();
    if let Some(path) = file {
        match std::fs::read_to_string(&path)
            .map_err(|source| ConfigFileError::Read {
                path: path.clone(),
                source,
            })
            .and_then(|text| with_defaults(command.clone(), &path, &text))
        {
            Ok(configured) => command = configured,
            Err(error) => command.error(clap::error::ErrorKind::ValueValidation, error).exit(),
        }
    }
    let matches: ArgMatches = command.get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit())
}

/// The value of `--config PATH` or `--config=PATH`, read before clap parses.
fn file_named(args: &[OsString]) -> Option<PathBuf> {
    let long = format!("--{FLAG}");
    let with_equals = format!("--{FLAG}=");
    let mut args = args.iter().skip(1);
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if text == "--" {
            return None;
        }
        if text == long {
            return args.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix(&with_equals) {
            return Some(PathBuf::from(path));
        }
    }
    None
}

/// `command` with the file's values as the defaults of the flags they name.
pub fn with_defaults(mut command: clap::Command, path: &Path, text: &str) -> Result<clap::Command, ConfigFileError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| ConfigFileError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    for (key, value) in table {
        let long = key.replace('_', "-");
        let values = strings(&value).ok_or_else(|| ConfigFileError::BadValue {
            path: path.to_owned(),
            key: key.clone(),
        })?;
        if long == FLAG || !set_default(&mut command, &long, &values) {
            return Err(ConfigFileError::UnknownKey {
                path: path.to_owned(),
                key,
            });
        }
    }
    Ok(command)
}

fn strings(value: &toml::Value) -> Option<Vec<String>> {
    match value {
        toml::Value::String(text) => Some(vec![text.clone()]),
        toml::Value::Integer(n) => Some(vec![n.to_string()]),
        toml::Value::Float(x) => Some(vec![x.to_string()]),
        toml::Value::Boolean(b) => Some(vec![b.to_string()]),
        toml::Value::Array(items) => {
            let mut all = Vec::new();
            for item in items {
                match item {
                    toml::Value::Array(_) | toml::Value::Table(_) => return None,
                    scalar => all.extend(strings(scalar)?),
                }
            }
            Some(all)
        }
        toml::Value::Table(_) | toml::Value::Datetime(_) => None,
    }
}

/// Sets the default of every argument with this long name, in `command` and all its
/// subcommands; returns whether there was one.
fn set_default(command: &mut clap::Command, long: &str, values: &[String]) -> bool {
    let mut found = false;
    let ids: Vec<clap::Id> = command
        .get_arguments()
        .filter(|arg| arg.get_long() == Some(long))
        .map(|arg| arg.get_id().clone())
        .collect();
    for id in ids {
        found = true;
        let owned = std::mem::take(command);
        *command = owned.mut_arg(id, |arg| arg.required(false).default_values(values.iter().cloned()));
    }
    let names: Vec<String> = command.get_subcommands().map(|sub| sub.get_name().to_owned()).collect();
    for name in names {
        let owned = std::mem::take(command);
        *command = owned.mut_subcommand(name, |mut sub| {
            found |= set_default(&mut sub, long, values);
            sub
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Command;

    fn parse_with(file: &str, args: &[&str]) -> Result<Cli, String> {
        let command = with_defaults(Cli::command(), Path::new("relay.toml"), file).map_err(|e| e.to_string())?;
        let matches = command
            .try_get_matches_from(std::iter::once("outbox-relay").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Cli::from_arg_matches(&matches).map_err(|e| e.to_string())
    }

    fn run_args(cli: Cli) -> crate::config::RunArgs {
        match cli.command {
            Command::Run(args) => args,
            other => panic!("not run: {other:?}"),
        }
    }

    const FILE: &str = r#"
        database_url = "postgres://app@db/app"
        bootstrap-servers = "kafka:9092"
        slot = "from_file"
        max_in_flight = 500
        kafka_property = ["linger.ms=5", "compression.type=zstd"]
        retention = "1h"
        json = true
        apply_sql = true
    "#;

    #[test]
    fn file_values_fill_in_what_the_command_line_leaves_out() {
        let run = run_args(parse_with(FILE, &["run"]).unwrap());
        assert_eq!(run.postgres.database_url, "postgres://app@db/app");
        assert_eq!(run.publish.kafka.bootstrap_servers.as_deref(), Some("kafka:9092"));
        assert_eq!(run.postgres.slot, "from_file");
        assert_eq!(run.publish.max_in_flight, 500);
        assert_eq!(run.retention, Some(std::time::Duration::from_secs(3600)));
        assert_eq!(
            run.publish.kafka.kafka_properties,
            vec![
                ("linger.ms".to_owned(), "5".to_owned()),
                ("compression.type".to_owned(), "zstd".to_owned())
            ]
        );
        // Untouched settings keep their built-in defaults.
        assert_eq!(run.postgres.publication, "outbox_pub");
    }

    #[test]
    fn a_flag_beats_the_file() {
        let run = run_args(parse_with(FILE, &["run", "--slot", "from_flag"]).unwrap());
        assert_eq!(run.postgres.slot, "from_flag");
    }

    #[test]
    fn keys_of_other_subcommands_are_accepted_and_booleans_work() {
        match parse_with(FILE, &["status"]).unwrap().command {
            Command::Status(args) => assert!(args.json),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let error = parse_with("bootstrap_servrs = \"x\"", &["run"]).unwrap_err();
        assert!(error.contains("unknown key `bootstrap_servrs`"), "{error}");
        let error = parse_with("config = \"other.toml\"", &["run"]).unwrap_err();
        assert!(error.contains("unknown key `config`"), "{error}");
    }

    #[test]
    fn bad_values_and_syntax_are_refused() {
        assert!(parse_with("[kafka]\nx = 1", &["run"]).unwrap_err().contains("`kafka`"));
        assert!(parse_with("slot = ", &["run"]).unwrap_err().contains("not valid TOML"));
        // Values are still validated as if given on the command line.
        let error = parse_with(
            "database_url = \"x\"\nbootstrap_servers = \"k\"\nslot = \"Bad-Name\"",
            &["run"],
        )
        .unwrap_err();
        assert!(error.contains("Bad-Name"), "{error}");
    }

    #[test]
    fn the_file_is_found_on_the_command_line() {
        let args = |list: &[&str]| list.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            file_named(&args(&["relay", "run", "--config", "a.toml"])),
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            file_named(&args(&["relay", "--config=b.toml", "run"])),
            Some(PathBuf::from("b.toml"))
        );
        assert_eq!(file_named(&args(&["relay", "run", "--", "--config", "c"])), None);
    }
}
