//! This host's transfer identity: a self-signed certificate and its private key, created on first
//! start under `<data>/identity/` and reused afterwards, so the fingerprint peers pinned stays
//! valid across restarts. The key file is written with mode 0600 before it holds any secret.
//! This module only keeps the files; whom to trust is in the peer records.

use crate::AgentError;
use crate::paths::DataPaths;
use novacron_transport::HostIdentity;
use rustls::pki_types::CertificateDer;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const CERTIFICATE_FILE: &str = "host.crt.der";
const KEY_FILE: &str = "host.key.der";

/// Loads the identity, or creates and stores one when there is none.
pub(crate) fn load_or_create(
    paths: &DataPaths,
    host_name: &str,
) -> Result<HostIdentity, AgentError> {
    let directory = paths.identity_dir();
    let certificate_path = directory.join(CERTIFICATE_FILE);
    let key_path = directory.join(KEY_FILE);
    let read = |path: &Path| match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(AgentError::io(format!("reading {}", path.display()), error)),
    };
    if let (Some(certificate), Some(key)) = (read(&certificate_path)?, read(&key_path)?) {
        let identity = HostIdentity::from_der(vec![CertificateDer::from(certificate)], key)
            .map_err(|error| AgentError::CorruptRecord {
                key: certificate_path.display().to_string(),
                reason: error.to_string(),
            })?;
        return Ok(identity);
    }
    std::fs::create_dir_all(&directory)
        .map_err(|error| AgentError::io(format!("creating {}", directory.display()), error))?;
    let identity = HostIdentity::generate_self_signed(host_name).map_err(|error| {
        AgentError::InvalidArgument(format!("cannot create this host's certificate: {error}"))
    })?;
    // Key first: a certificate without its key would be useless, a key without its certificate
    // is replaced on the next start (both are rewritten when either is missing).
    write_file(&key_path, identity.private_key_pkcs8_der(), 0o600)?;
    write_file(
        &certificate_path,
        identity.certificate_chain()[0].as_ref(),
        0o644,
    )?;
    tracing::info!(fingerprint = %identity.fingerprint(), "created this host's transfer identity");
    Ok(identity)
}

/// Writes `bytes` to a temporary file created with `mode`, syncs it and renames it into place.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    let temporary = path.with_extension("tmp");
    let context = || format!("writing {}", path.display());
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(|error| AgentError::io(context(), error))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| AgentError::io(context(), error))?;
    std::fs::rename(&temporary, path).map_err(|error| AgentError::io(context(), error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn identity_is_created_once_and_reused_with_a_private_key_file() {
        let directory = tempfile::tempdir().expect("temp dir");
        let paths = DataPaths::new(directory.path());
        let first = load_or_create(&paths, "host-a").expect("create");
        let second = load_or_create(&paths, "host-a").expect("load");
        assert_eq!(first.fingerprint(), second.fingerprint());
        let mode = std::fs::metadata(paths.identity_dir().join(KEY_FILE))
            .expect("key file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
