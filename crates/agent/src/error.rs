//! The agent's error: every failure names the object it concerns and, where there is one, what the
//! user can do about it. The API maps each variant to one stable error code.

use novacron_types::{ErrorCode, NameError, ParseSizeError, VmState};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    InvalidName(#[from] NameError),
    #[error(transparent)]
    InvalidSize(#[from] ParseSizeError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error(
        "data directory {directory} is in use by another `novacron serve` (pid {holder}); stop it \
         or pass another --data-dir"
    )]
    DataDirInUse { directory: String, holder: String },
    #[error("vm {name:?} does not exist; `novacron vm list` shows the VMs there are")]
    VmNotFound { name: String },
    #[error("vm {name:?} already exists; choose another name or delete it first")]
    VmAlreadyExists { name: String },
    #[error(
        "image {reference:?} does not exist; `novacron image list` shows the images, \
         `novacron image import FILE` adds one"
    )]
    ImageNotFound { reference: String },
    #[error("an image named {name:?} already exists (id {id}); delete it or choose another name")]
    ImageNameTaken { name: String, id: String },
    #[error("image {name:?} is used by vm(s) {users}; delete those VMs first")]
    ImageInUse { name: String, users: String },
    #[error("vm {name:?} is {state}; {hint}")]
    VmWrongState {
        name: String,
        state: VmState,
        hint: &'static str,
    },
    #[error("{what} does not fit on this host: asked for {asked}, the host has {available}")]
    InsufficientResources {
        what: &'static str,
        asked: String,
        available: String,
    },
    #[error("{file} is not a usable disk image: {reason}")]
    BadImage { file: String, reason: String },
    #[error("not enough disk space in {directory} for {what}: {reason}")]
    DiskFull {
        directory: String,
        what: String,
        reason: String,
    },
    #[error(transparent)]
    MissingBinary(#[from] novacron_qemu::BinaryError),
    #[error(transparent)]
    QemuImg(#[from] novacron_qemu::ImageError),
    #[error("vm {name:?}: {source}")]
    Qemu {
        name: String,
        #[source]
        source: novacron_qemu::VmError,
    },
    #[error("vm {name:?}: {source}")]
    Qmp {
        name: String,
        #[source]
        source: novacron_qemu::QmpError,
    },
    #[error("store: {0}")]
    Store(novacron_store::StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("record {key} in the store is unreadable: {reason}")]
    CorruptRecord { key: String, reason: String },
    #[error(
        "host {fingerprint} is not a trusted peer here; `novacron peer list` shows the trusted \
         ones"
    )]
    PeerNotFound { fingerprint: String },
    #[error("transfer {id:?} does not exist; `novacron transfer list` shows the transfers")]
    TransferNotFound { id: String },
    #[error(
        "no link to {peer:?} has been measured; a link appears once this host has sent to the \
         peer (`novacron link list` shows the measured ones)"
    )]
    LinkNotFound { peer: String },
    #[error(
        "migration {reference:?} does not exist; `novacron migration list` shows the migrations"
    )]
    MigrationNotFound { reference: String },
    /// A migration could not start or failed; `code` says why.
    #[error("{message}")]
    Migration { code: ErrorCode, message: String },
    /// A transfer could not start; `code` says why (unreachable, untrusted, name taken ...).
    #[error("{message}")]
    Transfer { code: ErrorCode, message: String },
    #[error(
        "host {host} does not mount shared storage {storage:?}; start its serve with \
         --shared-storage {storage}=PATH (the same file system the other hosts mount under that \
         name), or use a host that does"
    )]
    StorageNotMounted { storage: String, host: String },
    /// A region operation failed; `code` says how (no leader, refused token, host not found ...).
    #[error("{message}")]
    Cluster { code: ErrorCode, message: String },
}

impl From<novacron_store::StoreError> for AgentError {
    fn from(error: novacron_store::StoreError) -> Self {
        let message = error.to_string();
        if message.contains("No space left on device") {
            return AgentError::DiskFull {
                directory: "the store".into(),
                what: "a write".into(),
                reason: format!("{message}; free some space and restart novacron serve"),
            };
        }
        AgentError::Store(error)
    }
}

impl AgentError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        if source.raw_os_error() == Some(libc_enospc()) {
            return AgentError::DiskFull {
                directory: String::new(),
                what: context.into(),
                reason: source.to_string(),
            };
        }
        AgentError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            AgentError::InvalidName(_)
            | AgentError::InvalidSize(_)
            | AgentError::InvalidArgument(_)
            | AgentError::BadImage { .. } => ErrorCode::InvalidArgument,
            AgentError::VmNotFound { .. }
            | AgentError::ImageNotFound { .. }
            | AgentError::PeerNotFound { .. }
            | AgentError::TransferNotFound { .. }
            | AgentError::LinkNotFound { .. }
            | AgentError::MigrationNotFound { .. } => ErrorCode::NotFound,
            AgentError::Transfer { code, .. }
            | AgentError::Cluster { code, .. }
            | AgentError::Migration { code, .. } => *code,
            AgentError::VmAlreadyExists { .. } | AgentError::ImageNameTaken { .. } => {
                ErrorCode::AlreadyExists
            }
            AgentError::ImageInUse { .. }
            | AgentError::VmWrongState { .. }
            | AgentError::StorageNotMounted { .. } => ErrorCode::Conflict,
            AgentError::InsufficientResources { .. } | AgentError::DiskFull { .. } => {
                ErrorCode::InsufficientResources
            }
            AgentError::MissingBinary(_)
            | AgentError::Store(_)
            | AgentError::DataDirInUse { .. } => ErrorCode::Unavailable,
            AgentError::QemuImg(_)
            | AgentError::Qemu { .. }
            | AgentError::Qmp { .. }
            | AgentError::Io { .. }
            | AgentError::CorruptRecord { .. } => ErrorCode::Internal,
        }
    }
}

/// ENOSPC on Linux.
const fn libc_enospc() -> i32 {
    28
}
