//! Who a host is inside a cluster: the cluster certificate authority, each host's certificate
//! (issued for its raft node id), and CSR-based enrolment of a joining host.
//!
//! A host certificate names exactly one DNS subject alternative name,
//! `n<node id>.node.novacron.invalid` ([`node_server_name`]). A dialer asks TLS to verify that
//! name, so it only ever talks to the node it meant; the accepting side reads the node id from
//! the client certificate ([`node_id_of_certificate`]) and refuses raft messages that claim another
//! sender. The CA signs only names it chose itself: whatever a CSR asks for is ignored apart from
//! its public key (proven by the CSR's signature).
//!
//! This module creates, signs, checks and serializes identities; it does not decide where they are
//! stored (the caller keeps the CA key and each host's key, e.g. mode-0600 files in the data
//! directory) and it does no IO.

use std::time::{Duration, SystemTime};

use base64::Engine as _;
use novacron_transport::{Fingerprint, HostIdentity, PeerTrust, TlsSettings};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::X509Certificate;

use crate::error::{ClusterError, Result};

/// Domain under which every host certificate names its node.
pub const NODE_NAME_DOMAIN: &str = "node.novacron.invalid";

/// How long a host certificate is valid. Renewal is not built yet: a host re-enrols before then.
pub const HOST_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long the cluster CA is valid.
pub const CA_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
/// Certificates are valid from this long before their issue, so that small clock differences
/// between hosts do not make a fresh certificate "not yet valid".
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(3600);

/// The DNS name a node's certificate carries and a dialer verifies: `n<id>.node.novacron.invalid`.
pub fn node_server_name(node_id: u64) -> String {
    format!("n{node_id}.{NODE_NAME_DOMAIN}")
}

fn parse_node_server_name(name: &str) -> Option<u64> {
    let label = name.strip_suffix(NODE_NAME_DOMAIN)?.strip_suffix('.')?;
    let digits = label.strip_prefix('n')?;
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    // No leading zeros: one node id has exactly one name.
    if digits.len() > 1 && digits.starts_with('0') {
        return None;
    }
    digits.parse().ok()
}

fn parse_certificate(der: &[u8]) -> Result<X509Certificate<'_>> {
    let (rest, certificate) =
        x509_parser::parse_x509_certificate(der).map_err(|error| ClusterError::Certificate {
            action: "parse certificate",
            reason: error.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(ClusterError::Certificate {
            action: "parse certificate",
            reason: "trailing bytes after the certificate".into(),
        });
    }
    Ok(certificate)
}

/// The raft node id a host certificate was issued for: its single node name.
///
/// Only call this on a certificate whose chain was verified against the cluster CA (the TLS
/// handshake does that); the name alone proves nothing.
pub fn node_id_of_certificate(certificate_der: &[u8]) -> Result<u64> {
    let certificate = parse_certificate(certificate_der)?;
    let invalid = |reason: &str| ClusterError::Certificate {
        action: "read the node id of a host certificate",
        reason: reason.to_string(),
    };
    let names = certificate
        .subject_alternative_name()
        .map_err(|error| invalid(&error.to_string()))?
        .ok_or_else(|| invalid("the certificate has no subject alternative name"))?;
    let mut node_ids = names
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => parse_node_server_name(dns),
            _ => None,
        });
    let node_id = node_ids
        .next()
        .ok_or_else(|| invalid("the certificate names no novacron node"))?;
    if node_ids.next().is_some() {
        return Err(invalid("the certificate names more than one novacron node"));
    }
    Ok(node_id)
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = SystemTime::now();
    params.not_before = time::OffsetDateTime::from(now - CLOCK_SKEW_ALLOWANCE);
    params.not_after = time::OffsetDateTime::from(now + lifetime);
}

fn random_serial_number() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive INTEGER with no leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// PEM text of a DER certificate.
pub fn certificate_pem(certificate_der: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(certificate_der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// The DER of the first certificate in PEM text.
pub fn certificate_der_from_pem(pem: &str) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|error| ClusterError::Certificate {
        action: "read a pem certificate",
        reason: error.to_string(),
    })
}

/// File names of a saved [`NodeIdentity`] ([`NodeIdentity::save`]).
pub const HOST_CERTIFICATE_FILE: &str = "host.pem";
/// The host key file (mode 0600).
pub const HOST_KEY_FILE: &str = "host.key";
/// The cluster CA certificate file a host trusts.
pub const CA_CERTIFICATE_FILE: &str = "ca.pem";
/// The CA key file (mode 0600), only on hosts that admit others ([`ClusterCa::save`]).
pub const CA_KEY_FILE: &str = "ca.key";

/// Writes `contents` to `dir/name` atomically (temporary file, then rename), mode 0600 when
/// `secret`.
fn write_file(dir: &std::path::Path, name: &str, contents: &str, secret: bool) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let io_error = |action: &'static str| {
        move |error: std::io::Error| ClusterError::Certificate {
            action,
            reason: format!("{}: {error}", dir.join(name).display()),
        }
    };
    std::fs::create_dir_all(dir).map_err(io_error("create the identity directory"))?;
    let temporary = dir.join(format!(".{name}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&temporary)
        .map_err(io_error("write an identity file"))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_error("write an identity file"))?;
    std::fs::rename(&temporary, dir.join(name)).map_err(io_error("write an identity file"))
}

fn read_file(dir: &std::path::Path, name: &str) -> Result<String> {
    std::fs::read_to_string(dir.join(name)).map_err(|error| ClusterError::Certificate {
        action: "read an identity file",
        reason: format!("{}: {error}", dir.join(name).display()),
    })
}

/// The cluster certificate authority: signs host certificates. Created once at `cluster init`.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    certificate_der: CertificateDer<'static>,
    private_key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ClusterCa")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new CA (ECDSA P-256) for the cluster named `cluster_name`. It can sign host
    /// certificates only (path length 0).
    pub fn generate(cluster_name: &str) -> Result<ClusterCa> {
        let key_pair = KeyPair::generate().map_err(ClusterError::certificate("generate ca key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(ClusterError::certificate("build ca parameters"))?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("novacron cluster ca {cluster_name}"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial_number());
        validity(&mut params, CA_CERTIFICATE_VALIDITY);
        let certificate = params
            .self_signed(&key_pair)
            .map_err(ClusterError::certificate("self-sign ca certificate"))?;
        Ok(ClusterCa {
            certificate_der: certificate.der().clone(),
            private_key_pem: key_pair.serialize_pem(),
            issuer: Issuer::new(params, key_pair),
        })
    }

    /// Loads a CA saved with [`Self::certificate_pem`] and [`Self::private_key_pem`]; checks
    /// that the key belongs to the certificate.
    pub fn from_pem(certificate_pem: &str, private_key_pem: &str) -> Result<ClusterCa> {
        let certificate_der = certificate_der_from_pem(certificate_pem)?;
        let key_pair =
            KeyPair::from_pem(private_key_pem).map_err(ClusterError::certificate("read ca key"))?;
        {
            let certificate = parse_certificate(&certificate_der)?;
            if !certificate.is_ca() {
                return Err(ClusterError::Certificate {
                    action: "load the cluster ca",
                    reason: "the certificate is not a ca certificate".into(),
                });
            }
            if certificate.public_key().subject_public_key.data.as_ref()
                != key_pair.public_key_raw()
            {
                return Err(ClusterError::Certificate {
                    action: "load the cluster ca",
                    reason: "the private key does not belong to the ca certificate".into(),
                });
            }
        }
        let issuer = Issuer::from_ca_cert_der(&certificate_der, key_pair)
            .map_err(ClusterError::certificate("load the cluster ca"))?;
        Ok(ClusterCa {
            issuer,
            certificate_der,
            private_key_pem: private_key_pem.to_string(),
        })
    }

    /// Saves the CA into `dir` ([`CA_CERTIFICATE_FILE`], [`CA_KEY_FILE`] with mode 0600).
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        write_file(dir, CA_CERTIFICATE_FILE, &self.certificate_pem(), false)?;
        write_file(dir, CA_KEY_FILE, &self.private_key_pem, true)
    }

    /// Loads a CA saved with [`Self::save`].
    pub fn load(dir: &std::path::Path) -> Result<ClusterCa> {
        ClusterCa::from_pem(
            &read_file(dir, CA_CERTIFICATE_FILE)?,
            &read_file(dir, CA_KEY_FILE)?,
        )
    }

    /// The CA certificate (DER).
    pub fn certificate_der(&self) -> &CertificateDer<'static> {
        &self.certificate_der
    }

    /// The CA certificate (PEM), for hosts to trust.
    pub fn certificate_pem(&self) -> String {
        certificate_pem(&self.certificate_der)
    }

    /// The CA private key (PKCS#8 PEM). Secret: whoever holds it can admit hosts.
    pub fn private_key_pem(&self) -> &str {
        &self.private_key_pem
    }

    /// SHA-256 of the CA certificate: what a join token pins.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_certificate(self.certificate_der.as_ref())
    }

    /// Signs a joining host's CSR (PEM) as the certificate of raft node `node_id` and returns it
    /// (PEM). Only the CSR's public key is used (its signature proves the host holds the key);
    /// names, usages and validity are the CA's choice.
    pub fn sign_node_certificate(&self, csr_pem: &str, node_id: u64) -> Result<String> {
        let request = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(ClusterError::certificate("read the joining host's csr"))?;
        let mut params = CertificateParams::new(vec![node_server_name(node_id)]).map_err(
            ClusterError::certificate("build host certificate parameters"),
        )?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("novacron node {node_id}"));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial_number());
        validity(&mut params, HOST_CERTIFICATE_VALIDITY);
        let signed = CertificateSigningRequestParams {
            params,
            public_key: request.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(ClusterError::certificate("sign host certificate"))?;
        Ok(signed.pem())
    }

    /// Makes a key pair and a certificate for node `node_id` in one step (the first host at
    /// `cluster init`, and tests). Goes through the same CSR path as a joining host.
    pub fn issue_node_identity(&self, node_id: u64) -> Result<NodeIdentity> {
        let enrolment = NodeEnrolment::new()?;
        let certificate = self.sign_node_certificate(enrolment.csr_pem(), node_id)?;
        enrolment.complete(&certificate, &self.certificate_pem(), self.fingerprint())
    }
}

/// A host's identity in the cluster: its node id, certificate and key, and the CA it trusts.
#[derive(Clone)]
pub struct NodeIdentity {
    node_id: u64,
    host: HostIdentity,
    ca_certificate: CertificateDer<'static>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NodeIdentity")
            .field("node_id", &self.node_id)
            .field("fingerprint", &self.host.fingerprint())
            .field("ca_fingerprint", &self.ca_fingerprint())
            .finish()
    }
}

impl NodeIdentity {
    /// Loads an identity saved with the `*_pem` accessors. Checks that the certificate was
    /// signed by the CA, names one node, and belongs to the key.
    pub fn from_pem(
        certificate_pem: &str,
        private_key_pem: &str,
        ca_certificate_pem: &str,
    ) -> Result<NodeIdentity> {
        let certificate_der = certificate_der_from_pem(certificate_pem)?;
        let ca_certificate = certificate_der_from_pem(ca_certificate_pem)?;
        let key_pair = KeyPair::from_pem(private_key_pem)
            .map_err(ClusterError::certificate("read host key"))?;
        let invalid = |reason: String| ClusterError::Certificate {
            action: "load the host identity",
            reason,
        };
        {
            let leaf = parse_certificate(&certificate_der)?;
            let ca = parse_certificate(&ca_certificate)?;
            if !ca.is_ca() {
                return Err(invalid("the ca certificate is not a ca certificate".into()));
            }
            if leaf.issuer() != ca.subject() {
                return Err(invalid(
                    "the host certificate was not issued by this cluster ca".into(),
                ));
            }
            leaf.verify_signature(Some(ca.public_key())).map_err(|error| {
                invalid(format!(
                    "the host certificate's signature does not verify with the cluster ca: {error}"
                ))
            })?;
            if leaf.public_key().subject_public_key.data.as_ref() != key_pair.public_key_raw() {
                return Err(invalid(
                    "the private key does not belong to the host certificate".into(),
                ));
            }
        }
        let node_id = node_id_of_certificate(&certificate_der)?;
        let host = HostIdentity::from_der(
            vec![certificate_der, ca_certificate.clone()],
            key_pair.serialize_der(),
        )
        .map_err(|source| ClusterError::Tls { source })?;
        Ok(NodeIdentity {
            node_id,
            host,
            ca_certificate,
        })
    }

    /// Saves the identity into `dir` ([`HOST_CERTIFICATE_FILE`], [`HOST_KEY_FILE`] with mode
    /// 0600, [`CA_CERTIFICATE_FILE`]).
    pub fn save(&self, dir: &std::path::Path) -> Result<()> {
        write_file(dir, CA_CERTIFICATE_FILE, &self.ca_certificate_pem(), false)?;
        write_file(dir, HOST_KEY_FILE, &self.private_key_pem(), true)?;
        write_file(dir, HOST_CERTIFICATE_FILE, &self.certificate_pem(), false)
    }

    /// Loads an identity saved with [`Self::save`] (checked as [`Self::from_pem`] does).
    pub fn load(dir: &std::path::Path) -> Result<NodeIdentity> {
        NodeIdentity::from_pem(
            &read_file(dir, HOST_CERTIFICATE_FILE)?,
            &read_file(dir, HOST_KEY_FILE)?,
            &read_file(dir, CA_CERTIFICATE_FILE)?,
        )
    }

    /// The raft node id this identity was issued for.
    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// The host certificate and key, as the transport crate uses them.
    pub fn host_identity(&self) -> &HostIdentity {
        &self.host
    }

    /// The host certificate (PEM).
    pub fn certificate_pem(&self) -> String {
        certificate_pem(self.host.certificate_chain()[0].as_ref())
    }

    /// The host private key (PKCS#8 PEM). Secret.
    pub fn private_key_pem(&self) -> String {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(self.host.private_key_pkcs8_der());
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in encoded.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        pem
    }

    /// The cluster CA certificate (PEM).
    pub fn ca_certificate_pem(&self) -> String {
        certificate_pem(self.ca_certificate.as_ref())
    }

    /// The cluster CA certificate (DER).
    pub fn ca_certificate_der(&self) -> &CertificateDer<'static> {
        &self.ca_certificate
    }

    /// SHA-256 of the cluster CA certificate.
    pub fn ca_fingerprint(&self) -> Fingerprint {
        Fingerprint::of_certificate(self.ca_certificate.as_ref())
    }

    /// TLS settings for host-to-host connections: this certificate, peers verified against the
    /// cluster CA.
    pub fn tls_settings(&self) -> TlsSettings {
        TlsSettings {
            identity: self.host.clone(),
            trust: PeerTrust::ClusterCertificateAuthority {
                root_certificates: vec![self.ca_certificate.clone()],
            },
        }
    }
}

/// The joining host's half of enrolment: a fresh key pair (which never leaves the host) and a
/// CSR for the CA to sign.
pub struct NodeEnrolment {
    key_pair: KeyPair,
    csr_pem: String,
}

impl std::fmt::Debug for NodeEnrolment {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NodeEnrolment")
            .finish_non_exhaustive()
    }
}

impl NodeEnrolment {
    /// Generates the key pair and the CSR.
    pub fn new() -> Result<NodeEnrolment> {
        let key_pair =
            KeyPair::generate().map_err(ClusterError::certificate("generate host key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(ClusterError::certificate("build csr parameters"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "novacron joining host");
        let csr_pem = params
            .serialize_request(&key_pair)
            .and_then(|csr| csr.pem())
            .map_err(ClusterError::certificate("create csr"))?;
        Ok(NodeEnrolment { key_pair, csr_pem })
    }

    /// The CSR (PEM) to send to the cluster.
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// Finishes enrolment with the certificate the CA issued and the CA certificate the cluster
    /// sent, which must have the fingerprint pinned by the join token.
    pub fn complete(
        self,
        certificate_pem: &str,
        ca_certificate_pem: &str,
        pinned_ca_fingerprint: Fingerprint,
    ) -> Result<NodeIdentity> {
        let ca_der = certificate_der_from_pem(ca_certificate_pem)?;
        let found = Fingerprint::of_certificate(ca_der.as_ref());
        if found != pinned_ca_fingerprint {
            return Err(ClusterError::CaFingerprintMismatch {
                expected: pinned_ca_fingerprint.to_string(),
                found: found.to_string(),
            });
        }
        NodeIdentity::from_pem(
            certificate_pem,
            &self.key_pair.serialize_pem(),
            ca_certificate_pem,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip_and_reject_lookalikes() {
        for node_id in [0, 1, 42, u64::MAX] {
            assert_eq!(
                parse_node_server_name(&node_server_name(node_id)),
                Some(node_id)
            );
        }
        for name in [
            "n01.node.novacron.invalid",
            "n.node.novacron.invalid",
            "x1.node.novacron.invalid",
            "n1.node.novacron.invalid.evil",
            "n1node.novacron.invalid",
            "n1.other.invalid",
            "n-1.node.novacron.invalid",
        ] {
            assert_eq!(parse_node_server_name(name), None, "{name}");
        }
    }

    #[test]
    fn a_signed_csr_names_the_node_the_ca_chose_and_loads_back() {
        let ca = ClusterCa::generate("test").expect("ca");
        let identity = ca.issue_node_identity(7).expect("identity");
        assert_eq!(identity.node_id(), 7);
        assert_eq!(identity.ca_fingerprint(), ca.fingerprint());
        let leaf = identity.host_identity().certificate_chain()[0].clone();
        assert_eq!(node_id_of_certificate(leaf.as_ref()).expect("node id"), 7);

        let reloaded = NodeIdentity::from_pem(
            &identity.certificate_pem(),
            &identity.private_key_pem(),
            &identity.ca_certificate_pem(),
        )
        .expect("reload");
        assert_eq!(reloaded.node_id(), 7);
        assert_eq!(
            reloaded.host_identity().fingerprint(),
            identity.host_identity().fingerprint()
        );
    }

    #[test]
    fn the_ca_ignores_names_asked_for_in_the_csr() {
        let ca = ClusterCa::generate("test").expect("ca");
        let key_pair = KeyPair::generate().expect("key");
        let params =
            CertificateParams::new(vec![node_server_name(1), "n2.node.novacron.invalid".into()])
                .expect("params");
        let csr = params
            .serialize_request(&key_pair)
            .and_then(|csr| csr.pem())
            .expect("csr");
        let certificate = ca.sign_node_certificate(&csr, 9).expect("signed");
        let der = certificate_der_from_pem(&certificate).expect("der");
        assert_eq!(node_id_of_certificate(der.as_ref()).expect("node id"), 9);
    }

    #[test]
    fn a_tampered_csr_is_refused() {
        let ca = ClusterCa::generate("test").expect("ca");
        let enrolment = NodeEnrolment::new().expect("enrolment");
        let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(
            enrolment.csr_pem().as_bytes(),
        )
        .expect("csr der");
        let mut bytes = der.as_ref().to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        );
        let error = ca.sign_node_certificate(&tampered, 3).expect_err("refused");
        assert!(matches!(error, ClusterError::Certificate { .. }), "{error}");
    }

    #[test]
    fn enrolment_refuses_a_ca_other_than_the_pinned_one() {
        let ca = ClusterCa::generate("real").expect("ca");
        let impostor = ClusterCa::generate("impostor").expect("impostor");
        let enrolment = NodeEnrolment::new().expect("enrolment");
        let certificate = impostor
            .sign_node_certificate(enrolment.csr_pem(), 4)
            .expect("signed");
        let error = enrolment
            .complete(&certificate, &impostor.certificate_pem(), ca.fingerprint())
            .expect_err("refused");
        assert!(
            matches!(error, ClusterError::CaFingerprintMismatch { .. }),
            "{error}"
        );
    }

    #[test]
    fn a_certificate_from_another_ca_or_with_another_key_does_not_load() {
        let ca = ClusterCa::generate("one").expect("ca");
        let other = ClusterCa::generate("two").expect("other");
        let identity = ca.issue_node_identity(1).expect("identity");
        let foreign = other.issue_node_identity(1).expect("foreign");
        let wrong_ca = NodeIdentity::from_pem(
            &foreign.certificate_pem(),
            &foreign.private_key_pem(),
            &ca.certificate_pem(),
        );
        assert!(wrong_ca.is_err());
        let wrong_key = NodeIdentity::from_pem(
            &identity.certificate_pem(),
            &foreign.private_key_pem(),
            &ca.certificate_pem(),
        );
        assert!(wrong_key.is_err());
    }

    #[test]
    fn identities_are_saved_with_secret_keys_readable_only_by_the_owner() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ClusterCa::generate("files").expect("ca");
        ca.save(dir.path()).expect("save ca");
        let identity = ca.issue_node_identity(3).expect("identity");
        identity.save(dir.path()).expect("save identity");
        for (name, mode) in [
            (CA_KEY_FILE, 0o600),
            (HOST_KEY_FILE, 0o600),
            (HOST_CERTIFICATE_FILE, 0o644),
        ] {
            let metadata = std::fs::metadata(dir.path().join(name)).expect("metadata");
            assert_eq!(metadata.permissions().mode() & 0o777, mode, "{name}");
        }
        let loaded = NodeIdentity::load(dir.path()).expect("load identity");
        assert_eq!(loaded.node_id(), 3);
        assert_eq!(
            ClusterCa::load(dir.path()).expect("load ca").fingerprint(),
            ca.fingerprint()
        );
        let empty = tempfile::tempdir().expect("tempdir");
        let error = NodeIdentity::load(empty.path()).expect_err("nothing saved");
        assert!(error.to_string().contains("host.pem"), "{error}");
    }

    #[test]
    fn the_ca_survives_a_save_and_load() {
        let ca = ClusterCa::generate("saved").expect("ca");
        let loaded =
            ClusterCa::from_pem(&ca.certificate_pem(), ca.private_key_pem()).expect("load");
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        let identity = loaded.issue_node_identity(5).expect("issue after load");
        assert_eq!(identity.ca_fingerprint(), ca.fingerprint());
        let other = ClusterCa::generate("other").expect("other");
        assert!(ClusterCa::from_pem(&ca.certificate_pem(), other.private_key_pem()).is_err());
    }
}
