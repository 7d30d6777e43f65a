//! The handlers. Each one validates its input, calls the host agent once and maps the result.

use crate::ApiState;
use crate::error::ApiError;
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use novacron_agent::ImportSource;
use novacron_types::{
    ClusterHost, ClusterInfo, ClusterInitRequest, ClusterJoinRequest, ClusterMembershipChange,
    CreateJoinTokenRequest, JoinTokenInfo, PlacementPolicy, RemoveHostOptions, ScratchOutcome,
    ScratchRead, ScratchWrite,
};
use novacron_types::{
    CreateTransferRequest, CreateVmRequest, DeleteOptions, ErrorCode, Health, HostInfo,
    ImageRecord, LinkInfo, MigrateVmRequest, MigrationRecord, PeerRecord, ProbeLinkRequest,
    StopOptions, TransferInfo, TrustPeerRequest, VmEvent, VmRecord,
};
use serde::Deserialize;
use std::convert::Infallible;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

type ApiResult<T> = Result<T, ApiError>;

pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(host_info))
        .routes(routes!(list_vms, create_vm))
        .routes(routes!(get_vm, delete_vm))
        .routes(routes!(start_vm))
        .routes(routes!(stop_vm))
        .routes(routes!(restart_vm))
        .routes(routes!(pause_vm))
        .routes(routes!(resume_vm))
        .routes(routes!(vm_logs))
        .routes(routes!(vm_console))
        .routes(routes!(list_images, import_image))
        .routes(routes!(get_image, delete_image))
        .routes(routes!(list_peers, trust_peer))
        .routes(routes!(forget_peer))
        .routes(routes!(list_transfers, create_transfer))
        .routes(routes!(get_transfer, cancel_transfer))
        .routes(routes!(migrate_vm, cancel_vm_migration))
        .routes(routes!(list_migrations))
        .routes(routes!(get_migration))
        .routes(routes!(list_links))
        .routes(routes!(get_link))
        .routes(routes!(probe_link))
        .routes(routes!(events))
        .routes(routes!(cluster_info))
        .routes(routes!(cluster_init))
        .routes(routes!(cluster_join))
        .routes(routes!(create_join_token))
        .routes(routes!(remove_cluster_host))
        .routes(routes!(scratch_get, scratch_write))
        .routes(routes!(get_placement_policy, set_placement_policy))
}

/// Checks the bearer token on every path but health, and counts every request.
pub async fn authenticate(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let public = request.uri().path() == "/api/v1/health";
    let response = if public || token_matches(request.headers(), &state.admin_token) {
        next.run(request).await
    } else {
        ApiError::new(
            ErrorCode::Unauthenticated,
            "missing or wrong bearer token; send `Authorization: Bearer <token>` with the token \
             that `novacron serve` wrote into its data directory (admin.token)",
        )
        .into_response()
    };
    let labels = crate::metrics::RequestLabels {
        method,
        status: response.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    state
        .metrics
        .request_seconds
        .observe(started.elapsed().as_secs_f64());
    response
}

fn token_matches(headers: &HeaderMap, expected: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let Some(token) = value.strip_prefix("Bearer ") else {
        return false;
    };
    bool::from(token.trim().as_bytes().ct_eq(expected.as_bytes()))
}

/// Health of this host's API; the only call that needs no token.
#[utoipa::path(get, path = "/api/v1/health", tag = "host", security(()),
    responses((status = 200, body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// This host: capacity, accelerator, QEMU version.
#[utoipa::path(get, path = "/api/v1/host", tag = "host",
    responses((status = 200, body = HostInfo), (status = 401, body = novacron_types::ApiErrorBody)))]
async fn host_info(State(state): State<ApiState>) -> ApiResult<Json<HostInfo>> {
    Ok(Json(state.host.info().await?))
}

/// All VMs, ordered by name.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vms",
    responses((status = 200, body = Vec<VmRecord>), (status = 401, body = novacron_types::ApiErrorBody)))]
async fn list_vms(State(state): State<ApiState>) -> ApiResult<Json<Vec<VmRecord>>> {
    Ok(Json(state.host.list_vms().await?))
}

/// Creates a VM (and starts it unless `start` is false). Returns at once with the VM in
/// `creating`; watch its state with `GET /api/v1/vms/{name}` or the event stream.
#[utoipa::path(post, path = "/api/v1/vms", tag = "vms", request_body = CreateVmRequest,
    responses(
        (status = 201, body = VmRecord),
        (status = 400, description = "invalid name, size or path", body = novacron_types::ApiErrorBody),
        (status = 404, description = "unknown image", body = novacron_types::ApiErrorBody),
        (status = 409, description = "name taken", body = novacron_types::ApiErrorBody),
        (status = 422, description = "does not fit on the host", body = novacron_types::ApiErrorBody),
    ))]
async fn create_vm(
    State(state): State<ApiState>,
    body: Result<Json<CreateVmRequest>, JsonRejection>,
) -> ApiResult<(axum::http::StatusCode, Json<VmRecord>)> {
    let Json(request) = body?;
    let record = state.host.create_vm(request).await?;
    Ok((axum::http::StatusCode::CREATED, Json(record)))
}

/// One VM with its desired state and observed status.
#[utoipa::path(get, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 200, body = VmRecord), (status = 404, body = novacron_types::ApiErrorBody)))]
async fn get_vm(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Json<VmRecord>> {
    Ok(Json(state.host.get_vm(&name).await?))
}

/// Deletes a VM, its disk and its logs. A running VM is refused unless `force=true`.
#[utoipa::path(delete, path = "/api/v1/vms/{name}", tag = "vms",
    params(("name" = String, Path, description = "VM name"), DeleteOptions),
    responses((status = 202, body = VmRecord), (status = 404, body = novacron_types::ApiErrorBody),
        (status = 409, description = "running, use force", body = novacron_types::ApiErrorBody)))]
async fn delete_vm(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    options: Result<Query<DeleteOptions>, QueryRejection>,
) -> ApiResult<(axum::http::StatusCode, Json<VmRecord>)> {
    let Query(options) = options?;
    let record = state.host.delete_vm(&name, options).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(record)))
}

macro_rules! power_handler {
    ($function:ident, $path:literal, $doc:literal, $method:ident) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "vms",
            params(("name" = String, Path, description = "VM name")),
            responses((status = 202, body = VmRecord), (status = 404, body = novacron_types::ApiErrorBody),
                (status = 409, body = novacron_types::ApiErrorBody)))]
        async fn $function(
            State(state): State<ApiState>,
            Path(name): Path<String>,
        ) -> ApiResult<(axum::http::StatusCode, Json<VmRecord>)> {
            let record = state.host.$method(&name).await?;
            Ok((axum::http::StatusCode::ACCEPTED, Json(record)))
        }
    };
}

power_handler!(
    start_vm,
    "/api/v1/vms/{name}/start",
    "Starts a stopped or failed VM.",
    start_vm
);
power_handler!(
    restart_vm,
    "/api/v1/vms/{name}/restart",
    "Restarts a VM (a hard reset of QEMU).",
    restart_vm
);
power_handler!(
    pause_vm,
    "/api/v1/vms/{name}/pause",
    "Pauses a running VM's vCPUs.",
    pause_vm
);
power_handler!(
    resume_vm,
    "/api/v1/vms/{name}/resume",
    "Resumes a paused VM.",
    resume_vm
);

/// Stops a VM: ACPI power-down, then forced after `timeout_secs`; `force=true` skips the
/// power-down.
#[utoipa::path(post, path = "/api/v1/vms/{name}/stop", tag = "vms",
    params(("name" = String, Path, description = "VM name"), StopOptions),
    responses((status = 202, body = VmRecord), (status = 404, body = novacron_types::ApiErrorBody)))]
async fn stop_vm(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    options: Result<Query<StopOptions>, QueryRejection>,
) -> ApiResult<(axum::http::StatusCode, Json<VmRecord>)> {
    let Query(options) = options?;
    let record = state.host.stop_vm(&name, options).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(record)))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct LogOptions {
    /// Keep the response open and send new output as it arrives.
    #[serde(default)]
    follow: bool,
    /// Start this many bytes before the end (default: the whole log).
    tail_bytes: Option<u64>,
}

/// The VM's serial console output, kept in a file across restarts of the VM.
#[utoipa::path(get, path = "/api/v1/vms/{name}/logs", tag = "vms",
    params(("name" = String, Path, description = "VM name"), LogOptions),
    responses((status = 200, content_type = "text/plain", body = String),
        (status = 404, body = novacron_types::ApiErrorBody)))]
async fn vm_logs(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    options: Result<Query<LogOptions>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(options) = options?;
    let path = state.host.serial_log_path(&name).await?;
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => Some(file),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("reading {}: {error}", path.display()),
            ));
        }
    };
    if let (Some(file), Some(tail)) = (file.as_mut(), options.tail_bytes) {
        let length = file
            .metadata()
            .await
            .map(|metadata| metadata.len())
            .unwrap_or(0);
        let start = length.saturating_sub(tail);
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|error| ApiError::new(ErrorCode::Internal, error.to_string()))?;
    }
    let follow = options.follow;
    let host = state.host.clone();
    let stream = async_stream_log(file, path, follow, host, name);
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Streams a log file; with `follow`, keeps polling it for growth until the VM is deleted or
/// the client goes away (the stream is dropped).
fn async_stream_log(
    file: Option<tokio::fs::File>,
    path: std::path::PathBuf,
    follow: bool,
    host: std::sync::Arc<novacron_agent::Host>,
    name: String,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> {
    futures::stream::unfold((file, path), move |(mut file, path)| {
        let host = host.clone();
        let name = name.clone();
        async move {
            loop {
                if file.is_none() {
                    file = tokio::fs::File::open(&path).await.ok();
                }
                if let Some(open) = file.as_mut() {
                    let mut buffer = vec![0u8; 64 * 1024];
                    match open.read(&mut buffer).await {
                        Ok(0) => {}
                        Ok(count) => {
                            buffer.truncate(count);
                            return Some((Ok(bytes::Bytes::from(buffer)), (file, path)));
                        }
                        Err(error) => return Some((Err(error), (None, path))),
                    }
                }
                if !follow || host.get_vm(&name).await.is_err() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    })
}

/// Interactive serial console over a websocket: binary messages carry console bytes both ways.
#[utoipa::path(get, path = "/api/v1/vms/{name}/console", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 101, description = "websocket upgrade"),
        (status = 404, body = novacron_types::ApiErrorBody),
        (status = 409, description = "VM not running", body = novacron_types::ApiErrorBody)))]
async fn vm_console(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let socket_path = state.host.console_socket_path(&name).await?;
    let console = tokio::net::UnixStream::connect(&socket_path)
        .await
        .map_err(|error| {
            ApiError::new(
                ErrorCode::Conflict,
                format!("vm {name:?} console is not reachable ({error}); is the VM running?"),
            )
        })?;
    Ok(upgrade.on_upgrade(move |websocket| relay_console(websocket, console)))
}

async fn relay_console(websocket: WebSocket, console: tokio::net::UnixStream) {
    let (mut console_read, mut console_write) = console.into_split();
    let (mut socket_write, mut socket_read) = websocket.split();
    let to_client = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match console_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(count) => {
                    let message = Message::Binary(bytes::Bytes::copy_from_slice(&buffer[..count]));
                    if socket_write.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = socket_write.send(Message::Close(None)).await;
    };
    let from_client = async {
        while let Some(Ok(message)) = socket_read.next().await {
            let data = match message {
                Message::Binary(data) => data,
                Message::Text(text) => bytes::Bytes::copy_from_slice(text.as_bytes()),
                Message::Close(_) => break,
                _ => continue,
            };
            if console_write.write_all(&data).await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        () = to_client => {},
        () = from_client => {},
    }
}

/// All images, ordered by name.
#[utoipa::path(get, path = "/api/v1/images", tag = "images",
    responses((status = 200, body = Vec<ImageRecord>)))]
async fn list_images(State(state): State<ApiState>) -> ApiResult<Json<Vec<ImageRecord>>> {
    Ok(Json(state.host.list_images().await?))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
struct ImportOptions {
    /// Name of the new image.
    name: String,
}

/// Imports a disk image (qcow2 or raw) sent as the request body. The image is checked with
/// qemu-img and stored under the BLAKE3 hash of its content.
#[utoipa::path(post, path = "/api/v1/images", tag = "images", params(ImportOptions),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ImageRecord),
        (status = 400, description = "not a disk image", body = novacron_types::ApiErrorBody),
        (status = 409, description = "name taken", body = novacron_types::ApiErrorBody),
        (status = 422, description = "disk full", body = novacron_types::ApiErrorBody)))]
async fn import_image(
    State(state): State<ApiState>,
    options: Result<Query<ImportOptions>, QueryRejection>,
    body: Body,
) -> ApiResult<(axum::http::StatusCode, Json<ImageRecord>)> {
    let Query(options) = options?;
    let stream = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(std::io::Error::other));
    let record = state
        .host
        .import_image(&options.name, ImportSource::Stream(Box::pin(stream)))
        .await?;
    Ok((axum::http::StatusCode::CREATED, Json(record)))
}

/// One image, by name or id.
#[utoipa::path(get, path = "/api/v1/images/{image}", tag = "images",
    params(("image" = String, Path, description = "image name or id")),
    responses((status = 200, body = ImageRecord), (status = 404, body = novacron_types::ApiErrorBody)))]
async fn get_image(
    State(state): State<ApiState>,
    Path(image): Path<String>,
) -> ApiResult<Json<ImageRecord>> {
    Ok(Json(state.host.get_image(&image).await?))
}

/// Deletes an image; refused while a VM uses it.
#[utoipa::path(delete, path = "/api/v1/images/{image}", tag = "images",
    params(("image" = String, Path, description = "image name or id")),
    responses((status = 200, body = ImageRecord), (status = 404, body = novacron_types::ApiErrorBody),
        (status = 409, description = "in use", body = novacron_types::ApiErrorBody)))]
async fn delete_image(
    State(state): State<ApiState>,
    Path(image): Path<String>,
) -> ApiResult<Json<ImageRecord>> {
    Ok(Json(state.host.delete_image(&image).await?))
}

/// Hosts trusted for image transfers (pinned by certificate fingerprint).
#[utoipa::path(get, path = "/api/v1/peers", tag = "transfers",
    responses((status = 200, body = Vec<PeerRecord>)))]
async fn list_peers(State(state): State<ApiState>) -> ApiResult<Json<Vec<PeerRecord>>> {
    Ok(Json(state.host.list_peers().await?))
}

/// Trusts a host for image transfers by the fingerprint `GET /api/v1/host` shows on it. Trusting
/// it again replaces its label.
#[utoipa::path(post, path = "/api/v1/peers", tag = "transfers", request_body = TrustPeerRequest,
    responses((status = 201, body = PeerRecord),
        (status = 400, description = "not a fingerprint", body = novacron_types::ApiErrorBody)))]
async fn trust_peer(
    State(state): State<ApiState>,
    body: Result<Json<TrustPeerRequest>, JsonRejection>,
) -> ApiResult<(axum::http::StatusCode, Json<PeerRecord>)> {
    let Json(request) = body?;
    let record = state.host.trust_peer(request).await?;
    Ok((axum::http::StatusCode::CREATED, Json(record)))
}

/// Stops trusting a host (by fingerprint or label); new sessions from it are refused.
#[utoipa::path(delete, path = "/api/v1/peers/{peer}", tag = "transfers",
    params(("peer" = String, Path, description = "fingerprint or label")),
    responses((status = 200, body = PeerRecord), (status = 404, body = novacron_types::ApiErrorBody)))]
async fn forget_peer(
    State(state): State<ApiState>,
    Path(peer): Path<String>,
) -> ApiResult<Json<PeerRecord>> {
    Ok(Json(state.host.forget_peer(&peer).await?))
}

/// Image transfers this host runs or ran (both those it started and those a peer started):
/// this run's and the last 1000 finished ones of earlier runs, oldest first.
#[utoipa::path(get, path = "/api/v1/transfers", tag = "transfers",
    responses((status = 200, body = Vec<TransferInfo>)))]
async fn list_transfers(State(state): State<ApiState>) -> Json<Vec<TransferInfo>> {
    Json(state.host.list_transfers())
}

/// Starts pushing an image to a peer or pulling one from it. Returns once the peer accepted
/// (the transfer then runs in the background; poll `GET /api/v1/transfers/{id}`), or at once
/// with `already_present` when the destination holds the image.
#[utoipa::path(post, path = "/api/v1/transfers", tag = "transfers",
    request_body = CreateTransferRequest,
    responses((status = 201, body = TransferInfo),
        (status = 400, description = "bad fingerprint, address or name", body = novacron_types::ApiErrorBody),
        (status = 401, description = "the peer does not trust this host, or is not the fingerprinted host", body = novacron_types::ApiErrorBody),
        (status = 404, description = "unknown image", body = novacron_types::ApiErrorBody),
        (status = 409, description = "name taken at the destination", body = novacron_types::ApiErrorBody),
        (status = 422, description = "no disk space at the destination", body = novacron_types::ApiErrorBody),
        (status = 503, description = "peer unreachable", body = novacron_types::ApiErrorBody)))]
async fn create_transfer(
    State(state): State<ApiState>,
    body: Result<Json<CreateTransferRequest>, JsonRejection>,
) -> ApiResult<(axum::http::StatusCode, Json<TransferInfo>)> {
    let Json(request) = body?;
    let info = state.host.start_transfer(request).await?;
    Ok((axum::http::StatusCode::CREATED, Json(info)))
}

/// Starts moving a running VM to another host of the region, live (a stopped VM moves cold: at
/// once without a disk, with its disk otherwise, and stays stopped). `to` names the host; without it placement chooses. Returns the
/// migration; poll `GET /api/v1/migrations/{id}` for its phase and progress.
#[utoipa::path(post, path = "/api/v1/vms/{name}/migrate", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    request_body = MigrateVmRequest,
    responses((status = 202, body = MigrationRecord),
        (status = 400, description = "not in a region, the VM's own host, unknown host, bad limit", body = novacron_types::ApiErrorBody),
        (status = 404, description = "unknown VM", body = novacron_types::ApiErrorBody),
        (status = 409, description = "already migrating, being deleted, starting or stopping, or has a local disk", body = novacron_types::ApiErrorBody),
        (status = 422, description = "no host has room", body = novacron_types::ApiErrorBody)))]
async fn migrate_vm(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Result<Json<MigrateVmRequest>, JsonRejection>,
) -> ApiResult<(axum::http::StatusCode, Json<MigrationRecord>)> {
    let Json(request) = body?;
    let migration = state.host.migrate_vm(&name, request).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(migration)))
}

/// Cancels a VM's migration: it ends as `cancelled` and the VM stays on its source host (unless
/// the switch-over already recorded the new host).
#[utoipa::path(delete, path = "/api/v1/vms/{name}/migrate", tag = "vms",
    params(("name" = String, Path, description = "VM name")),
    responses((status = 202, body = MigrationRecord),
        (status = 404, body = novacron_types::ApiErrorBody),
        (status = 409, description = "not migrating", body = novacron_types::ApiErrorBody)))]
async fn cancel_vm_migration(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<(axum::http::StatusCode, Json<MigrationRecord>)> {
    let migration = state.host.cancel_migration(&name).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(migration)))
}

/// Every migration of the region, newest first (history included).
#[utoipa::path(get, path = "/api/v1/migrations", tag = "vms",
    responses((status = 200, body = Vec<MigrationRecord>), (status = 401, body = novacron_types::ApiErrorBody)))]
async fn list_migrations(State(state): State<ApiState>) -> ApiResult<Json<Vec<MigrationRecord>>> {
    Ok(Json(state.host.list_migrations().await?))
}

/// One migration by id, or the latest migration of a VM by the VM's name.
#[utoipa::path(get, path = "/api/v1/migrations/{id}", tag = "vms",
    params(("id" = String, Path, description = "migration id or VM name")),
    responses((status = 200, body = MigrationRecord), (status = 404, body = novacron_types::ApiErrorBody)))]
async fn get_migration(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<MigrationRecord>> {
    Ok(Json(state.host.get_migration(&id).await?))
}

/// One transfer with its progress.
#[utoipa::path(get, path = "/api/v1/transfers/{id}", tag = "transfers",
    params(("id" = String, Path, description = "transfer id")),
    responses((status = 200, body = TransferInfo), (status = 404, body = novacron_types::ApiErrorBody)))]
async fn get_transfer(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<TransferInfo>> {
    Ok(Json(state.host.get_transfer(&id)?))
}

/// Cancels a running transfer: it ends as `cancelled`, leaving no image or staging file at the
/// destination (chunks already received stay in its chunk store, so a rerun is cheaper).
#[utoipa::path(delete, path = "/api/v1/transfers/{id}", tag = "transfers",
    params(("id" = String, Path, description = "transfer id")),
    responses((status = 202, body = TransferInfo), (status = 404, body = novacron_types::ApiErrorBody)))]
async fn cancel_transfer(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<(axum::http::StatusCode, Json<TransferInfo>)> {
    let info = state.host.cancel_transfer(&id)?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(info)))
}

/// The links to peers this host has sent over: current rate, forecasts with their 80 % bands per
/// horizon, the predictor in use and its accuracy so far. Only sending measures a link.
#[utoipa::path(get, path = "/api/v1/links", tag = "transfers",
    responses((status = 200, body = Vec<LinkInfo>)))]
async fn list_links(State(state): State<ApiState>) -> ApiResult<Json<Vec<LinkInfo>>> {
    Ok(Json(state.host.list_links().await?))
}

/// One link, by the peer's fingerprint or label.
#[utoipa::path(get, path = "/api/v1/links/{peer}", tag = "transfers",
    params(("peer" = String, Path, description = "fingerprint or peer label")),
    responses((status = 200, body = LinkInfo), (status = 404, body = novacron_types::ApiErrorBody)))]
async fn get_link(
    State(state): State<ApiState>,
    Path(peer): Path<String>,
) -> ApiResult<Json<LinkInfo>> {
    Ok(Json(state.host.get_link(&peer).await?))
}

/// Measures the link to a peer now: sends it incompressible data for a few seconds (the peer
/// discards it), which feeds the link's model as any transfer does, and returns the link. The
/// peer is a fingerprint, a peer label or a region host's name.
#[utoipa::path(post, path = "/api/v1/links/{peer}/probe", tag = "transfers",
    params(("peer" = String, Path, description = "fingerprint, peer label or region host name")),
    request_body = ProbeLinkRequest,
    responses((status = 200, body = LinkInfo), (status = 400, body = novacron_types::ApiErrorBody),
        (status = 404, body = novacron_types::ApiErrorBody)))]
async fn probe_link(
    State(state): State<ApiState>,
    Path(peer): Path<String>,
    Json(request): Json<ProbeLinkRequest>,
) -> ApiResult<Json<LinkInfo>> {
    Ok(Json(state.host.probe_link(&peer, &request).await?))
}

/// Server-sent events: one `vm` event (JSON `VmEvent`) per VM state change.
#[utoipa::path(get, path = "/api/v1/events", tag = "host",
    responses((status = 200, content_type = "text/event-stream", body = VmEvent)))]
async fn events(
    State(state): State<ApiState>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let receiver = state.host.subscribe_events();
    let stream = tokio_stream::wrappers::BroadcastStream::new(receiver).map(|item| {
        Ok(match item {
            Ok(event) => Event::default()
                .event("vm")
                .id(event.revision.to_string())
                .json_data(&event)
                .unwrap_or_else(|_| Event::default().comment("unencodable event")),
            Err(_) => Event::default()
                .event("lagged")
                .data("events were dropped; re-list VMs"),
        })
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The region: hosts with their raft role, raft address, health (from heartbeats) and capacity.
/// On a host that is not in a region, the one host.
#[utoipa::path(get, path = "/api/v1/cluster", tag = "cluster",
    responses((status = 200, body = ClusterInfo),
        (status = 503, description = "no reachable leader", body = novacron_types::ApiErrorBody)))]
async fn cluster_info(State(state): State<ApiState>) -> ApiResult<Json<ClusterInfo>> {
    Ok(Json(state.host.cluster_info().await?))
}

/// Makes this host the first host of a region: creates the cluster CA and this host's
/// certificate (node 1), then `serve` restarts itself (same pid) with its cluster listener.
/// VMs and images already here become the region's.
#[utoipa::path(post, path = "/api/v1/cluster/init", tag = "cluster",
    request_body = ClusterInitRequest,
    responses((status = 202, body = ClusterMembershipChange),
        (status = 400, description = "bad name or address, port in use", body = novacron_types::ApiErrorBody),
        (status = 409, description = "already in a region", body = novacron_types::ApiErrorBody)))]
async fn cluster_init(
    State(state): State<ApiState>,
    body: Result<Json<ClusterInitRequest>, JsonRejection>,
) -> ApiResult<(axum::http::StatusCode, Json<ClusterMembershipChange>)> {
    let Json(request) = body?;
    let change = state.host.cluster_init(request).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(change)))
}

/// Joins a region with a one-time token: this (fresh) host enrols with the region's first
/// host, then `serve` restarts itself with an empty store, is added as a learner and catches up;
/// the leader promotes it to voter when the voter policy says so (1, 3, 5 voters).
#[utoipa::path(post, path = "/api/v1/cluster/join", tag = "cluster",
    request_body = ClusterJoinRequest,
    responses((status = 202, body = ClusterMembershipChange),
        (status = 400, description = "bad, used or expired token; bad address", body = novacron_types::ApiErrorBody),
        (status = 409, description = "already in a region, or not a fresh host", body = novacron_types::ApiErrorBody),
        (status = 503, description = "the region's host is unreachable", body = novacron_types::ApiErrorBody)))]
async fn cluster_join(
    State(state): State<ApiState>,
    body: Result<Json<ClusterJoinRequest>, JsonRejection>,
) -> ApiResult<(axum::http::StatusCode, Json<ClusterMembershipChange>)> {
    let Json(request) = body?;
    let change = state.host.cluster_join(request).await?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(change)))
}

/// Creates a one-time, expiring join token (only on a host holding the cluster CA). The token is
/// shown once; the region keeps only its hash.
#[utoipa::path(post, path = "/api/v1/cluster/tokens", tag = "cluster",
    request_body = CreateJoinTokenRequest,
    responses((status = 201, body = JoinTokenInfo),
        (status = 400, description = "not in a region; lifetime out of range", body = novacron_types::ApiErrorBody),
        (status = 409, description = "this host does not hold the CA", body = novacron_types::ApiErrorBody)))]
async fn create_join_token(
    State(state): State<ApiState>,
    body: Result<Json<CreateJoinTokenRequest>, JsonRejection>,
) -> ApiResult<(axum::http::StatusCode, Json<JoinTokenInfo>)> {
    let Json(request) = body?;
    let token = state.host.create_join_token(request).await?;
    Ok((axum::http::StatusCode::CREATED, Json(token)))
}

/// Removes a host (by name or node id) from the region. Refused while VMs are assigned to it
/// unless `force=true`, which does not move them (the CLI's `cluster remove --force` migrates
/// them away first).
#[utoipa::path(delete, path = "/api/v1/cluster/hosts/{host}", tag = "cluster",
    params(("host" = String, Path, description = "host name or node id"), RemoveHostOptions),
    responses((status = 200, body = ClusterHost),
        (status = 404, body = novacron_types::ApiErrorBody),
        (status = 409, description = "VMs assigned, use force; or the last voter", body = novacron_types::ApiErrorBody)))]
async fn remove_cluster_host(
    State(state): State<ApiState>,
    Path(host): Path<String>,
    options: Result<Query<RemoveHostOptions>, QueryRejection>,
) -> ApiResult<Json<ClusterHost>> {
    let Query(options) = options?;
    Ok(Json(state.host.remove_cluster_host(&host, options).await?))
}

/// Reads a scratch key, linearizably (through the leader in a region). Needs `serve
/// --scratch-keys`; for checking the store from outside and for diagnostics.
#[utoipa::path(get, path = "/api/v1/scratch/{key}", tag = "cluster",
    params(("key" = String, Path, description = "letters, digits, '-', '_', '.'")),
    responses((status = 200, body = ScratchRead),
        (status = 400, description = "bad key", body = novacron_types::ApiErrorBody),
        (status = 404, description = "the scratch keyspace is off", body = novacron_types::ApiErrorBody),
        (status = 503, description = "no leader reachable", body = novacron_types::ApiErrorBody)))]
async fn scratch_get(
    State(state): State<ApiState>,
    Path(key): Path<String>,
) -> ApiResult<Json<ScratchRead>> {
    Ok(Json(state.host.scratch_get(&key).await?))
}

/// One conditional write of a scratch key: `put` or `delete`, applied when every condition
/// holds. An answer that never came (timeout, lost leader) means the write may or may not
/// have been applied.
#[utoipa::path(post, path = "/api/v1/scratch/{key}", tag = "cluster",
    params(("key" = String, Path, description = "letters, digits, '-', '_', '.'")),
    request_body = ScratchWrite,
    responses((status = 200, body = ScratchOutcome),
        (status = 400, description = "bad key or write", body = novacron_types::ApiErrorBody),
        (status = 404, description = "the scratch keyspace is off", body = novacron_types::ApiErrorBody),
        (status = 503, description = "no leader reachable", body = novacron_types::ApiErrorBody)))]
async fn scratch_write(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    body: Result<Json<ScratchWrite>, JsonRejection>,
) -> ApiResult<Json<ScratchOutcome>> {
    let Json(write) = body?;
    Ok(Json(state.host.scratch_write(&key, write).await?))
}

/// The region's placement policy: strategy (spread or bin-pack), overcommit ratios,
/// anti-affinity mode and the scoring weights.
#[utoipa::path(get, path = "/api/v1/cluster/placement-policy", tag = "cluster",
    responses((status = 200, body = PlacementPolicy),
        (status = 503, description = "no reachable leader", body = novacron_types::ApiErrorBody)))]
async fn get_placement_policy(State(state): State<ApiState>) -> ApiResult<Json<PlacementPolicy>> {
    Ok(Json(state.host.placement_policy().await?))
}

/// Replaces the region's placement policy (fields left out take their defaults). Applies to
/// VMs placed from now on; VMs already placed stay.
#[utoipa::path(put, path = "/api/v1/cluster/placement-policy", tag = "cluster",
    request_body = PlacementPolicy,
    responses((status = 200, body = PlacementPolicy),
        (status = 400, description = "a ratio or weight out of range", body = novacron_types::ApiErrorBody),
        (status = 503, description = "no reachable leader", body = novacron_types::ApiErrorBody)))]
async fn set_placement_policy(
    State(state): State<ApiState>,
    body: Result<Json<PlacementPolicy>, JsonRejection>,
) -> ApiResult<Json<PlacementPolicy>> {
    let Json(policy) = body?;
    Ok(Json(state.host.set_placement_policy(policy).await?))
}
