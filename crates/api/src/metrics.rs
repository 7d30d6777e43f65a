//! Prometheus metrics of the API (`/metrics`). Every metric declared here is updated by the
//! authentication middleware, which sees every request.

use crate::ApiState;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub status: u16,
}

pub struct ApiMetrics {
    registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_seconds: Histogram,
}

impl ApiMetrics {
    /// Adds the API's metrics to `registry` (which may already hold other components' metrics)
    /// and serves all of them.
    pub fn new(mut registry: Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let request_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let api = registry.sub_registry_with_prefix("api");
        api.register(
            "requests",
            "API requests by method and status",
            requests.clone(),
        );
        api.register(
            "request_seconds",
            "time to the response head of API requests",
            request_seconds.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            request_seconds,
        }
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            tracing::error!(%error, "metrics encoding failed");
        }
        text
    }
}

pub async fn render(State(state): State<ApiState>) -> impl IntoResponse {
    let text = state.metrics.encode();
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
}
