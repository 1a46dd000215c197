//! The operations endpoint: `/metrics` (Prometheus), `/healthz` (the process answers),
//! `/readyz` (streaming, the broker answering and acknowledging, lag within the limit; or a
//! hot standby waiting for the slot, with the broker answering).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::metrics::Metrics;
use crate::readiness::Health;
use crate::shutdown::Shutdown;

#[derive(Clone)]
struct Shared {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    max_lag: Duration,
}

/// Binds `addr` (port 0 picks a free one) and returns the bound address and the server
/// future, which ends on shutdown.
pub async fn bind(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    max_lag: Duration,
    mut shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let shared = Shared {
        metrics,
        health,
        max_lag,
    };
    let router = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(shared);
    let server = async move {
        let serve = axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.wait().await });
        if let Err(error) = serve.await {
            tracing::warn!(%error, "operations endpoint stopped");
        }
    };
    Ok((bound, server))
}

async fn metrics_text(State(shared): State<Shared>) -> ([(&'static str, &'static str); 1], String) {
    shared.metrics.lag_seconds.set(shared.health.lag_seconds());
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.encode(),
    )
}

async fn readiness(State(shared): State<Shared>) -> (StatusCode, String) {
    match shared.health.readiness(&shared.metrics, shared.max_lag) {
        Ok(state) => (StatusCode::OK, format!("ready: {state}\n")),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
    }
}
