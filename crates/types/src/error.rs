//! The API's error body and its stable machine-readable codes. Every library error maps to one code
//! (and one HTTP status) in the API crate; scripts match on the code, people read the message.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Stable error codes. Never renumber or rename one: scripts depend on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a value is out of range.
    InvalidArgument,
    /// No bearer token, or a wrong one.
    Unauthenticated,
    /// The named object does not exist.
    NotFound,
    /// An object with that name already exists.
    AlreadyExists,
    /// The object is in a state that forbids the operation (e.g. deleting a running VM).
    Conflict,
    /// The host lacks the CPU, memory or disk the request needs.
    InsufficientResources,
    /// A dependency (QEMU, qemu-img, the store) is missing or not ready.
    Unavailable,
    /// A bug or an unexpected failure; the message and the server log say more.
    Internal,
}

impl ErrorCode {
    /// Process exit code the CLI uses for this error, so scripts can branch without parsing.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorCode::InvalidArgument => 2,
            ErrorCode::Unauthenticated => 3,
            ErrorCode::NotFound => 4,
            ErrorCode::AlreadyExists => 5,
            ErrorCode::Conflict => 6,
            ErrorCode::InsufficientResources => 7,
            ErrorCode::Unavailable => 8,
            ErrorCode::Internal => 1,
        }
    }
}

/// JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ApiErrorBody {
    pub code: ErrorCode,
    pub message: String,
}
