//! What a run measured, as Markdown tables, as JSON figures and as a plot
//! (`scripts/bench-plot.py`, matplotlib, when `scripts/bench` has installed it).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::{backfill, broker, drain, probe, rabbitmq, steady, tls};

#[derive(Default)]
pub struct Results {
    pub drains: Vec<drain::Row>,
    pub broker: Option<broker::Baseline>,
    pub steady: Vec<steady::Steady>,
    pub tls: Option<tls::Row>,
    pub backfill: Option<backfill::Row>,
    pub sinks: Vec<rabbitmq::Row>,
}

impl Results {
    pub fn markdown(&self) -> String {
        let mut table = String::new();
        if !self.drains.is_empty() {
            table.push_str(&format!(
                "Backlog drain, events per second:\n\n{}\n",
                drain::RATES_HEADER
            ));
            for row in &self.drains {
                table.push_str(&row.rates_markdown());
                table.push('\n');
            }
            table.push_str(&format!("\nBacklog drain, resources:\n\n{}\n", drain::RESOURCES_HEADER));
            for row in &self.drains {
                table.push_str(&row.resources_markdown());
                table.push('\n');
            }
        }
        if let Some(row) = &self.tls {
            table.push_str(&format!(
                "\nThe relay over TLS (verify-full) and plain text, one backlog:\n\n{}\n{}\n",
                tls::HEADER,
                row.markdown()
            ));
        }
        if let Some(row) = &self.backfill {
            table.push_str(&format!(
                "\nBackfill at cutover (`setup --backfill true`, rows written as in b):\n\n{}\n{}\n",
                backfill::HEADER,
                row.markdown()
            ));
        }
        if !self.sinks.is_empty() {
            table.push_str(&format!(
                "\nOther sinks, against a SKIP LOCKED poller with the same client library:\n\n{}\n",
                rabbitmq::HEADER
            ));
            for row in &self.sinks {
                table.push_str(&row.markdown());
                table.push('\n');
            }
        }
        if let Some(baseline) = &self.broker {
            table.push_str(&format!(
                "\nThe broker alone, a plain rdkafka producer with the relay's settings:\n\n{}\n{}\n",
                broker::HEADER,
                baseline.markdown()
            ));
        }
        if !self.steady.is_empty() {
            table.push_str(&format!(
                "\nSteady state, single-row transactions:\n\n{}\n",
                steady::HEADER
            ));
            for row in &self.steady {
                table.push_str(&row.markdown());
                table.push('\n');
            }
        }
        table
    }

    fn figures(&self) -> serde_json::Value {
        let drains: Vec<_> = self
            .drains
            .iter()
            .map(|row| {
                let n = row.events as f64;
                json!({
                    "scenario": row.scenario.name,
                    "events": row.events,
                    "relay": n / row.relay_secs,
                    "pg_recvlogical": n / row.reader_secs,
                    "poller": n / row.poller_secs,
                    "debezium": row.debezium.map(|d| n / d.drain_secs),
                })
            })
            .collect();
        let steady: Vec<_> = self
            .steady
            .iter()
            .filter(|s| s.events > 0 && !s.latency.is_empty())
            .map(|s| {
                let ms = |q: f64| s.latency.value_at_quantile(q) as f64 / 1000.0;
                json!({
                    "publisher": format!("{:?}", s.publisher),
                    "rate": s.events as f64 / s.seconds,
                    "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999),
                })
            })
            .collect();
        let tls = self.tls.as_ref().map(|row| {
            let n = row.events as f64;
            json!({
                "events": row.events,
                "relay_plain": n / row.plain.secs,
                "relay_tls": n / row.tls.secs,
                "pg_recvlogical_plain": n / row.recvlogical_plain_secs,
                "pg_recvlogical_tls": n / row.recvlogical_tls_secs,
            })
        });
        json!({
            "tls": tls,
            "drains": drains,
            "broker": self.broker.map(|b| b.events as f64 / b.secs),
            "steady": steady,
        })
    }
}

/// Writes the tables to `path`, the figures beside it as JSON and, when matplotlib is
/// there, the plot as SVG.
pub fn write(path: &str, command: &str, table: &str, results: &Results) {
    let text = format!(
        "Written by `scripts/bench {command}` on {} ({} CPUs).\n\n{table}",
        probe::machine(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    std::fs::write(path, text).expect("write the tables");
    let figures = Path::new(path).with_extension("json");
    std::fs::write(
        &figures,
        serde_json::to_string_pretty(&results.figures()).expect("json"),
    )
    .expect("write the figures");
    println!("written to {path} and {}", figures.display());
    let python =
        std::env::var_os("BENCH_PLOT_PYTHON").map_or_else(|| PathBuf::from(".tools/plot/bin/python"), PathBuf::from);
    if !python.exists() {
        println!("no plot: matplotlib's venv is missing (scripts/bench installs it)");
        return;
    }
    let svg = Path::new(path).with_extension("svg");
    let plotted = Command::new(python)
        .arg("scripts/bench-plot.py")
        .arg(&figures)
        .arg(&svg)
        .status()
        .is_ok_and(|s| s.success());
    if plotted {
        println!("plot: {}", svg.display());
    } else {
        println!("the plot failed (scripts/bench-plot.py)");
    }
}
