//! The crate's error type: every failure names the object (namespace, device, file, command)
//! and what was being done.

use std::path::PathBuf;

/// Errors from setting up, running or tearing down an emulated link or region.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A trace file could not be read.
    #[error("cannot read trace file {}", path.display())]
    TraceRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A trace file is not in the one-timestamp-per-line format.
    #[error("trace file {} line {line}: {reason}", path.display())]
    TraceFormat {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    /// The builder was given settings that cannot work.
    #[error("invalid link configuration: {reason}")]
    InvalidConfiguration { reason: String },
    /// A TUN or TAP device could not be created (needs root and /dev/net/tun).
    #[error(
        "cannot create {kind} device from pattern {pattern:?} (root and /dev/net/tun are needed)"
    )]
    CreateDevice {
        kind: &'static str,
        pattern: String,
        #[source]
        source: std::io::Error,
    },
    /// A helper command (`ip`, ...) could not be started.
    #[error("cannot start `{command}` (is iproute2 installed?)")]
    CommandStart {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A helper command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// The calling thread could not join a network namespace.
    #[error("cannot enter network namespace {namespace}")]
    EnterNamespace {
        namespace: String,
        #[source]
        source: std::io::Error,
    },
    /// A sysctl inside a namespace could not be written.
    #[error("cannot set {key} in network namespace {namespace}")]
    Sysctl {
        namespace: String,
        key: String,
        #[source]
        source: std::io::Error,
    },
    /// A forwarder thread could not be started.
    #[error("cannot start forwarder thread {thread}")]
    StartThread {
        thread: String,
        #[source]
        source: std::io::Error,
    },
    /// A host index outside the region.
    #[error("region has {host_count} hosts, there is no host {host}")]
    NoSuchHost { host: usize, host_count: usize },
}
