//! NovaCron regions (issue 4, first part): the store's raft between hosts over mutual TLS, and
//! the pure pieces that membership is built from.
//!
//! - [`identity`]: the cluster CA, host certificates naming their raft node id, CSR enrolment.
//! - [`MtlsRaftTransport`] (dialing) and [`RaftServer`] (accepting): raft messages, forwarded
//!   writes and read-index requests over one multiplexed mTLS connection per peer
//!   (format in [`wire`]).
//! - [`ClusterStore`]: transactions and linearizable reads that work on any node.
//! - [`join`]: one-time expiring join tokens, node id allocation, host admission.
//! - [`joiner`]: the joining host's side: enrolment over the listener, CA pinned by the token.
//! - [`membership`]: the voter policy (1 → 3 → 5 voters, lost voters replaced), pure.
//! - [`timing`]: raft heartbeat and election timeouts from measured RTTs, pure.
//!
//! Use on a host: load its [`NodeIdentity`], build an [`MtlsRaftTransport`], bind a
//! [`RaftListener`] (its address is the node's raft address), open the [`novacron_store::Store`]
//! with the transport, `serve` the listener with the store, and wrap both in a [`ClusterStore`].

pub mod cluster_store;
pub mod error;
pub mod identity;
pub mod join;
pub mod joiner;
pub mod membership;
pub mod server;
pub mod timing;
pub mod transport;
pub mod wire;

pub use cluster_store::ClusterStore;
pub use error::{ClusterError, Result};
pub use identity::{
    ClusterCa, NodeEnrolment, NodeIdentity, node_id_of_certificate, node_server_name,
};
pub use server::{RaftListener, RaftServer, SharedCa};
pub use transport::{MtlsRaftOptions, MtlsRaftTransport};
