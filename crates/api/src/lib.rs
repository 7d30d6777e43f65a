//! NovaCron's REST API under `/api/v1`: thin handlers that validate a request, hand it to the
//! host agent (which writes desired state to the store) and turn the result into JSON. The OpenAPI
//! document is generated from these handlers; `openapi/novacron.json` in the repository is a copy
//! that a test keeps equal to it.
//!
//! This crate owns HTTP concerns only (routing, auth, status codes, streaming); it must not decide
//! anything about VMs.

mod error;
mod metrics;
mod routes;

pub use error::ApiError;
pub use metrics::ApiMetrics;

use axum::Router;
use novacron_agent::Host;
use std::sync::Arc;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

/// Everything a handler needs.
#[derive(Clone)]
pub struct ApiState {
    pub host: Arc<Host>,
    /// The bearer token every call but health must carry.
    pub admin_token: Arc<String>,
    pub metrics: Arc<ApiMetrics>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "NovaCron API",
        description = "Control plane for QEMU virtual machines. Every call but /api/v1/health \
                       needs `Authorization: Bearer <token>`; errors are JSON with a stable `code`.",
        license(name = "Apache-2.0")
    ),
    modifiers(&BearerSecurity),
    security(("bearer" = [])),
    tags(
        (name = "vms", description = "Virtual machines"),
        (name = "images", description = "Disk images"),
        (name = "transfers", description = "Trusted peers and image transfers between hosts (DWCP)"),
        (name = "host", description = "This host, health and events"),
        (name = "cluster", description = "The region: hosts, join tokens, init, join, removal")
    )
)]
struct ApiDoc;

struct BearerSecurity;

impl utoipa::Modify for BearerSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

fn api_router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi()).merge(routes::router())
}

/// The OpenAPI document of this build.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let (_, document) = api_router().split_for_parts();
    document
}

/// The OpenAPI document as pretty JSON with a trailing newline, exactly as checked in.
pub fn openapi_json() -> String {
    let mut json = openapi_document()
        .to_pretty_json()
        .unwrap_or_else(|error| format!("{{\"error\": \"{error}\"}}"));
    json.push('\n');
    json
}

/// The whole HTTP service: the API, its OpenAPI document and `/metrics`.
pub fn app(state: ApiState) -> Router {
    let (router, document) = api_router().split_for_parts();
    let document = Arc::new(document);
    router
        .route(
            "/api/v1/openapi.json",
            axum::routing::get(move || {
                let document = document.clone();
                async move { axum::Json(document.as_ref().clone()) }
            }),
        )
        .route("/metrics", axum::routing::get(metrics::render))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::authenticate,
        ))
        .with_state(state)
}
