//! The API client the CLI commands use: finds the token, sends requests and turns error bodies
//! into [`CliError`]s that carry the API's stable code (and so the process exit code).

use crate::cli::ClientOptions;
use novacron_types::{ApiErrorBody, ErrorCode};
use reqwest::{Method, RequestBuilder, Response};
use serde::de::DeserializeOwned;
use std::path::PathBuf;

/// An error the CLI prints and exits with.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    pub code: ErrorCode,
    pub message: String,
}

impl CliError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

pub type CliResult<T> = Result<T, CliError>;

/// The default data directory: `$XDG_DATA_HOME/novacron`, else `~/.local/share/novacron`.
pub fn default_data_dir() -> PathBuf {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|value| !value.is_empty()) {
        return PathBuf::from(xdg).join("novacron");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".local/share/novacron")
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    token_source: String,
}

impl Client {
    pub fn new(options: &ClientOptions) -> CliResult<Self> {
        let base = options.server.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(CliError::new(
                ErrorCode::InvalidArgument,
                format!("--server {base:?} must be an http:// or https:// URL"),
            ));
        }
        let (token, token_source) = match &options.token {
            Some(token) => (Some(token.clone()), "--token/NOVACRON_TOKEN".to_string()),
            None => {
                let path = options
                    .data_dir
                    .clone()
                    .unwrap_or_else(default_data_dir)
                    .join("admin.token");
                match std::fs::read_to_string(&path) {
                    Ok(token) => (Some(token.trim().to_string()), path.display().to_string()),
                    Err(_) => (None, path.display().to_string()),
                }
            }
        };
        let http = reqwest::Client::builder()
            .build()
            .map_err(|error| CliError::new(ErrorCode::Internal, format!("http client: {error}")))?;
        Ok(Self {
            http,
            base,
            token,
            token_source,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut builder = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        builder
    }

    /// Sends a request and maps transport failures and error bodies to [`CliError`].
    pub async fn send(&self, builder: RequestBuilder) -> CliResult<Response> {
        let response = builder.send().await.map_err(|error| {
            CliError::new(
                ErrorCode::Unavailable,
                format!(
                    "cannot reach the NovaCron API at {} ({}); is `novacron serve` running? \
                     (--server / NOVACRON_SERVER choose another host)",
                    self.base,
                    root_cause(&error)
                ),
            )
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ApiErrorBody>(&text) {
            Ok(body) if body.code == ErrorCode::Unauthenticated && self.token.is_none() => {
                Err(CliError::new(
                    body.code,
                    format!(
                        "{}\nno token was found at {}; pass --token or NOVACRON_TOKEN, or \
                         --data-dir for a host's data directory",
                        body.message, self.token_source
                    ),
                ))
            }
            Ok(body) => Err(CliError::new(body.code, body.message)),
            Err(_) => Err(CliError::new(
                ErrorCode::Internal,
                format!("the API answered {status}: {}", text.trim()),
            )),
        }
    }

    pub async fn json<T: DeserializeOwned>(&self, builder: RequestBuilder) -> CliResult<T> {
        let response = self.send(builder).await?;
        response.json::<T>().await.map_err(|error| {
            CliError::new(
                ErrorCode::Internal,
                format!("unexpected answer from the API: {error}"),
            )
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> CliResult<T> {
        self.json(self.request(Method::GET, path)).await
    }
}

fn root_cause(error: &dyn std::error::Error) -> String {
    let mut current = error;
    while let Some(source) = current.source() {
        current = source;
    }
    current.to_string()
}
