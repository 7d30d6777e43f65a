//! Network namespaces and the `ip` command: creating and deleting namespaces, running commands
//! and closures inside them, writing per-namespace sysctls, and removing namespaces left behind
//! by runs that were killed before they could clean up.
//!
//! Every namespace this crate makes is named `nle-<prefix>-<pid>-<serial>-<role>`, where `pid` is
//! the process that owns it; a namespace whose owner no longer exists is a leftover.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::LinkError;
use crate::sys;

/// Prefix of every namespace this crate creates.
pub const NAMESPACE_PREFIX: &str = "nle-";

static NEXT_SERIAL: AtomicU64 = AtomicU64::new(0);

/// A fresh instance name `nle-<prefix>-<pid>-<serial>`, unique on this machine while this
/// process lives.
pub(crate) fn unique_instance_name(prefix: &str) -> Result<String, LinkError> {
    if prefix.is_empty()
        || prefix.len() > 16
        || !prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return Err(LinkError::InvalidConfiguration {
            reason: format!("name prefix {prefix:?} must be 1-16 characters of a-z and 0-9"),
        });
    }
    let serial = NEXT_SERIAL.fetch_add(1, Ordering::Relaxed);
    Ok(format!(
        "{NAMESPACE_PREFIX}{prefix}-{}-{serial}",
        std::process::id()
    ))
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub fn run_checked(command: &mut Command) -> Result<String, LinkError> {
    let printable = format!("{command:?}").replace('"', "");
    let output = command.output().map_err(|source| LinkError::CommandStart {
        command: printable.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(LinkError::CommandFailed {
            command: printable,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `ip` with these arguments.
pub fn ip(arguments: &[&str]) -> Result<String, LinkError> {
    run_checked(Command::new("ip").args(arguments))
}

/// Runs `ip -n <namespace>` with these arguments.
pub fn ip_in(namespace: &str, arguments: &[&str]) -> Result<String, LinkError> {
    run_checked(Command::new("ip").arg("-n").arg(namespace).args(arguments))
}

/// Creates a namespace with its loopback up.
pub fn create_namespace(name: &str) -> Result<(), LinkError> {
    ip(&["netns", "add", name])?;
    ip_in(name, &["link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a namespace (and every device still inside it); a missing namespace is not an error.
pub fn delete_namespace(name: &str) -> Result<(), LinkError> {
    if !Path::new("/run/netns").join(name).exists() {
        return Ok(());
    }
    ip(&["netns", "delete", name]).map(drop)
}

/// Names of all namespaces bound under /run/netns.
pub fn list_namespaces() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// A `Command` that runs `program` inside `namespace` (`ip netns exec <namespace> <program>`).
pub fn command_in(namespace: &str, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", namespace, program]);
    command
}

/// Runs `work` on a fresh thread that has joined `namespace`, and returns its result. Sockets
/// created by `work` stay in that namespace and may be used from any thread afterwards.
pub fn in_namespace<T, F>(namespace: &str, work: F) -> Result<T, LinkError>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            sys::enter_network_namespace(namespace).map_err(|source| {
                LinkError::EnterNamespace {
                    namespace: namespace.to_owned(),
                    source,
                }
            })?;
            Ok(work())
        });
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Writes sysctls (`net.ipv4.tcp_rmem` style keys) inside `namespace`.
pub fn set_sysctls(namespace: &str, settings: &[(&str, &str)]) -> Result<(), LinkError> {
    in_namespace(namespace, || {
        for (key, value) in settings {
            let path = Path::new("/proc/sys").join(key.replace('.', "/"));
            std::fs::write(&path, value).map_err(|source| LinkError::Sysctl {
                namespace: namespace.to_owned(),
                key: (*key).to_owned(),
                source,
            })?;
        }
        Ok(())
    })?
}

/// The owning process id encoded in a namespace name made by this crate.
fn owner_of(namespace: &str) -> Option<u32> {
    let rest = namespace.strip_prefix(NAMESPACE_PREFIX)?;
    rest.split('-').nth(1)?.parse().ok()
}

/// Deletes namespaces made by this crate whose owning process is gone (a killed test or CLI).
/// Returns the names deleted. Namespaces of live processes are never touched.
pub fn cleanup_stale() -> Result<Vec<String>, LinkError> {
    let mut removed = Vec::new();
    for name in list_namespaces() {
        let Some(owner) = owner_of(&name) else {
            continue;
        };
        if sys::process_exists(owner) {
            continue;
        }
        match delete_namespace(&name) {
            Ok(()) => removed.push(name),
            // Another process may be cleaning up the same leftover at the same moment.
            Err(error) if !Path::new("/run/netns").join(&name).exists() => {
                tracing::debug!(namespace = %name, %error, "leftover already removed");
            }
            Err(error) => return Err(error),
        }
    }
    if !removed.is_empty() {
        tracing::info!(
            count = removed.len(),
            "removed namespaces left by killed runs"
        );
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_are_unique_and_carry_the_owner() {
        let first = unique_instance_name("t").expect("valid prefix");
        let second = unique_instance_name("t").expect("valid prefix");
        assert_ne!(first, second);
        assert_eq!(owner_of(&format!("{first}-a")), Some(std::process::id()));
        assert_eq!(owner_of("other-namespace"), None);
        assert!(unique_instance_name("Bad-Prefix").is_err());
        assert!(unique_instance_name("").is_err());
    }
}
