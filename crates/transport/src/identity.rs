//! Host identities for the transport: a TLS certificate and its private key, and the SHA-256
//! fingerprint by which a peer pins it.
//!
//! Before a cluster exists every host generates a self-signed certificate
//! ([`HostIdentity::generate_self_signed`]) and peers pin each other's fingerprint. Once a cluster
//! CA exists (issue 4), [`ClusterCertificateAuthority`] issues host certificates that peers verify
//! against the CA root instead. This module only creates and describes identities; deciding whom to
//! trust lives in `tls`.

use std::fmt;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::TransportError;

/// SHA-256 of a certificate's DER encoding: the pinned identity of a host.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// Fingerprint of a DER-encoded certificate.
    pub fn of_certificate(certificate_der: &[u8]) -> Fingerprint {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, certificate_der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }
}

impl fmt::Display for Fingerprint {
    /// Lowercase hex with a `sha256:` prefix, the form operators copy between hosts.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("sha256:")?;
        for byte in self.0 {
            write!(formatter, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, formatter)
    }
}

impl FromStr for Fingerprint {
    type Err = TransportError;

    /// Accepts `sha256:<64 hex>` or bare 64 hex digits, with optional `:` separators.
    fn from_str(text: &str) -> Result<Fingerprint, TransportError> {
        let invalid = || TransportError::InvalidFingerprint {
            text: text.to_string(),
        };
        let hex: String = text
            .trim()
            .strip_prefix("sha256:")
            .unwrap_or(text.trim())
            .chars()
            .filter(|character| *character != ':')
            .collect();
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(invalid());
        }
        let mut bytes = [0u8; 32];
        for (index, byte) in bytes.iter_mut().enumerate() {
            *byte =
                u8::from_str_radix(&hex[index * 2..index * 2 + 2], 16).map_err(|_| invalid())?;
        }
        Ok(Fingerprint(bytes))
    }
}

/// A host's certificate chain and private key.
pub struct HostIdentity {
    certificate_chain: Vec<CertificateDer<'static>>,
    private_key_pkcs8_der: Vec<u8>,
}

impl Clone for HostIdentity {
    fn clone(&self) -> HostIdentity {
        HostIdentity {
            certificate_chain: self.certificate_chain.clone(),
            private_key_pkcs8_der: self.private_key_pkcs8_der.clone(),
        }
    }
}

impl fmt::Debug for HostIdentity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("HostIdentity")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl HostIdentity {
    /// A new self-signed certificate (ECDSA P-256) naming `host_name`, to be pinned by peers.
    pub fn generate_self_signed(host_name: &str) -> Result<HostIdentity, TransportError> {
        let key_pair = KeyPair::generate().map_err(certificate_error("generate host key"))?;
        let params = host_certificate_params(host_name)?;
        let certificate = params
            .self_signed(&key_pair)
            .map_err(certificate_error("self-sign host certificate"))?;
        Ok(HostIdentity {
            certificate_chain: vec![certificate.der().clone()],
            private_key_pkcs8_der: key_pair.serialize_der(),
        })
    }

    /// An identity from an existing DER chain (leaf first) and PKCS#8 DER private key.
    pub fn from_der(
        certificate_chain: Vec<CertificateDer<'static>>,
        private_key_pkcs8_der: Vec<u8>,
    ) -> Result<HostIdentity, TransportError> {
        if certificate_chain.is_empty() {
            return Err(TransportError::Certificate {
                action: "load host identity",
                reason: "empty certificate chain".to_string(),
            });
        }
        Ok(HostIdentity {
            certificate_chain,
            private_key_pkcs8_der,
        })
    }

    /// The fingerprint a peer pins: SHA-256 of the leaf certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of_certificate(self.certificate_chain[0].as_ref())
    }

    /// Leaf first.
    pub fn certificate_chain(&self) -> &[CertificateDer<'static>] {
        &self.certificate_chain
    }

    /// The private key, PKCS#8 DER, for storing the identity (keep it secret).
    pub fn private_key_pkcs8_der(&self) -> &[u8] {
        &self.private_key_pkcs8_der
    }

    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.private_key_pkcs8_der.clone()))
    }
}

/// A cluster certificate authority that signs host certificates.
///
/// Issue 4 creates one at `cluster init` and stores it; here it exists so the CA-verified path of
/// the transport is exercised by tests before clustering does.
pub struct ClusterCertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    root_certificate: CertificateDer<'static>,
}

impl ClusterCertificateAuthority {
    /// A new CA with a self-signed root named `cluster_name`.
    pub fn generate(cluster_name: &str) -> Result<ClusterCertificateAuthority, TransportError> {
        let key_pair = KeyPair::generate().map_err(certificate_error("generate ca key"))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(certificate_error("build ca parameters"))?;
        params.distinguished_name.push(
            DnType::CommonName,
            format!("novacron cluster ca {cluster_name}"),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let root = params
            .self_signed(&key_pair)
            .map_err(certificate_error("self-sign ca root"))?;
        Ok(ClusterCertificateAuthority {
            root_certificate: root.der().clone(),
            issuer: Issuer::new(params, key_pair),
        })
    }

    /// The root certificate peers verify host certificates against.
    pub fn root_certificate(&self) -> &CertificateDer<'static> {
        &self.root_certificate
    }

    /// A host certificate for `host_name`, valid for both TLS client and server authentication.
    pub fn issue_host_identity(&self, host_name: &str) -> Result<HostIdentity, TransportError> {
        let key_pair = KeyPair::generate().map_err(certificate_error("generate host key"))?;
        let params = host_certificate_params(host_name)?;
        let certificate = params
            .signed_by(&key_pair, &self.issuer)
            .map_err(certificate_error("sign host certificate"))?;
        Ok(HostIdentity {
            certificate_chain: vec![certificate.der().clone(), self.root_certificate.clone()],
            private_key_pkcs8_der: key_pair.serialize_der(),
        })
    }
}

fn host_certificate_params(host_name: &str) -> Result<CertificateParams, TransportError> {
    let mut params = CertificateParams::new(vec![host_name.to_string()])
        .map_err(certificate_error("build host certificate parameters"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("novacron host {host_name}"));
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

fn certificate_error(action: &'static str) -> impl Fn(rcgen::Error) -> TransportError {
    move |error| TransportError::Certificate {
        action,
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_through_text() {
        let identity = HostIdentity::generate_self_signed("host-a").unwrap();
        let fingerprint = identity.fingerprint();
        let text = fingerprint.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fingerprint);
        assert!("sha256:zz".parse::<Fingerprint>().is_err());
        assert!("é".repeat(32).parse::<Fingerprint>().is_err());
    }

    #[test]
    fn distinct_hosts_have_distinct_fingerprints() {
        let first = HostIdentity::generate_self_signed("host-a").unwrap();
        let second = HostIdentity::generate_self_signed("host-a").unwrap();
        assert_ne!(first.fingerprint(), second.fingerprint());
    }
}
