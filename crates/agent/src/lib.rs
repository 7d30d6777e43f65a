//! The host agent: what one `novacron serve` does on its host.
//!
//! [`Host`] is the service the API calls: it validates requests and writes desired state into
//! the store (VM and image records), and it runs the reconciler ([`reconciler`]), which watches
//! the store and drives QEMU until reality matches the records. The API never touches QEMU; the
//! reconciler never decides what the user wants. Every reconciler step is idempotent, so a
//! `novacron serve` killed at any point converges again after a restart.

mod error;
mod events;
mod host;
mod identity;
mod images;
mod kept;
mod links;
mod migration;
pub mod paths;
mod reconciler;
mod records;
mod region;
mod resources;
mod scratch;
mod storage;
mod transfer;
mod vms;

pub use error::AgentError;
pub use host::{Host, HostConfig, Hypervisor, ensure_admin_token};
pub use images::ImportSource;
pub use paths::DataPaths;
pub use region::{DEFAULT_RAFT_LISTEN, HEARTBEAT_INTERVAL, UNREACHABLE_AFTER};
pub use transfer::protocol::TRANSFER_PROTOCOL_VERSION;
