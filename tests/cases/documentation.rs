//! README.md and docker-compose.yml name exactly the settings the code has.

use std::collections::BTreeSet;

use clap::CommandFactory;
use outbox_relay::config::Cli;

/// Logging filter read by tracing-subscriber, not by clap.
const NOT_FLAGS: [&str; 1] = ["OUTBOX_RELAY_LOG"];

/// (long flag, environment variable) of every setting, across subcommands.
fn settings() -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    let mut commands = vec![Cli::command()];
    while let Some(command) = commands.pop() {
        for arg in command.get_arguments() {
            if let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) {
                found.insert((format!("--{long}"), env.to_string_lossy().into_owned()));
            }
        }
        commands.extend(command.get_subcommands().cloned());
    }
    found
}

fn environment_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("OUTBOX_RELAY_") || word.starts_with("DATABASE_") || word == "KAFKA_BOOTSTRAP_SERVERS" {
            names.insert(word.to_owned());
        }
    }
    names
}

fn read(file: &str) -> String {
    std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn readme_lists_every_setting_with_its_flag_and_variable() {
    let readme = read("README.md");
    for (flag, env) in settings() {
        assert!(readme.contains(&format!("`{flag}")), "README.md does not list {flag}");
        assert!(readme.contains(&format!("`{env}`")), "README.md does not list {env}");
    }
}

#[test]
fn docs_and_compose_name_no_setting_the_code_lacks() {
    let known: BTreeSet<String> = settings().into_iter().map(|(_, env)| env).collect();
    for file in [
        "README.md",
        "docker-compose.yml",
        "docs/architecture.md",
        "deploy/kubernetes/deployment.yaml",
    ] {
        for name in environment_names_in(&read(file)) {
            assert!(
                known.contains(&name) || NOT_FLAGS.contains(&name.as_str()),
                "{file} names {name}, which outbox-relay does not read"
            );
        }
    }
}

#[test]
fn the_readme_config_file_example_is_accepted() {
    let readme = read("README.md");
    let example = readme
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README.md has a ```toml example");
    outbox_relay::config_file::with_defaults(Cli::command(), std::path::Path::new("README.md"), example)
        .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn the_alert_rules_pass_promtool() {
    let rules = format!("{}/deploy/prometheus-alerts.yml", env!("CARGO_MANIFEST_DIR"));
    let output = std::process::Command::new("promtool")
        .args(["check", "rules", &rules])
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool ({e}); scripts/install-deps installs it"));
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_kubernetes_manifests_are_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let manifests: Vec<String> = std::fs::read_dir(format!("{root}/deploy/kubernetes"))
        .unwrap()
        .flatten()
        .map(|entry| entry.path().display().to_string())
        .filter(|path| path.ends_with(".yaml"))
        .collect();
    assert!(manifests.len() >= 2, "{manifests:?}");
    // Installed by scripts/install-deps; validates offline against bundled schemas.
    let output = std::process::Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict"])
        .args(&manifests)
        .env("PYTHONPATH", format!("{root}/.tools/py-k8s"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubernetes-validate ({e}); scripts/install-deps installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(text.matches(" passed for resource ").count() >= 3, "{text}");
    let deployment = read("deploy/kubernetes/deployment.yaml");
    for expected in [
        "replicas: 2",
        "path: /readyz",
        "path: /healthz",
        "DATABASE_PASSWORD_FILE",
        "secretName: outbox-relay-tls",
    ] {
        assert!(deployment.contains(expected), "deployment.yaml lacks {expected:?}");
    }
}
