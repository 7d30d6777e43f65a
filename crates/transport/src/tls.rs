//! TLS configuration for every transport connection: mutual authentication, TLS 1.3 only, the
//! aws-lc-rs provider (so the hybrid post-quantum group X25519MLKEM768 is offered first and
//! negotiated whenever the peer offers it too).
//!
//! Two ways to trust a peer: a pinned SHA-256 fingerprint of its certificate (before a cluster
//! exists) or a cluster CA root (once it does). The pinned verifiers accept exactly the pinned
//! certificates and nothing else; signatures over the handshake are still checked, so holding a
//! copy of a certificate without its key gets nobody in. This module must not relax either check
//! for convenience: there is no "insecure" mode.

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::error::TransportError;
use crate::identity::{Fingerprint, HostIdentity};

/// Server name used on the wire when peers are pinned by fingerprint (names are not checked then).
pub const PINNED_SERVER_NAME: &str = "novacron-peer.invalid";

/// Whom a host accepts as its peer.
#[derive(Clone, Debug)]
pub enum PeerTrust {
    /// Exactly these certificates, by SHA-256 fingerprint. A dialer usually pins one; a listener
    /// may accept several hosts.
    PinnedFingerprints(Vec<Fingerprint>),
    /// Any certificate chaining to one of these cluster CA roots (and, on the dialer, naming the
    /// server name it dials).
    ClusterCertificateAuthority {
        root_certificates: Vec<CertificateDer<'static>>,
    },
}

/// This host's identity and its trust policy for peers.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub identity: HostIdentity,
    pub trust: PeerTrust,
}

/// The crypto provider every transport connection uses.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Seeds aws-lc's random generator on a thread of its own, once per process; later calls return
/// at once. True when this call started the seeding.
///
/// aws-lc seeds its generator from CPU timing jitter the first time a process asks it for
/// random bytes, which took 30-46 ms here. The first handshake asks for them (its key shares),
/// so unwarmed that time sat on the critical path of both ends: between the dialer's TCP
/// handshake and its ClientHello, and again between the listener's accept and its ServerHello.
/// [`Session::connect`](crate::Session::connect) calls this before its TCP handshake, so the
/// seeding overlaps that round trip, and [`Listener::bind`](crate::Listener::bind) calls it
/// before any peer can dial (bench/transport/README.md, "The first handshake of a process").
pub fn warm_up_random() -> bool {
    static STARTED: std::sync::Once = std::sync::Once::new();
    let mut started = false;
    STARTED.call_once(|| {
        started = true;
        let seed = || {
            let mut byte = [0u8; 1];
            if let Err(error) = aws_lc_rs::rand::fill(&mut byte) {
                tracing::debug!(%error, "cannot warm up the random generator");
            }
        };
        if let Err(error) = std::thread::Builder::new()
            .name("novacron-rng-seed".to_string())
            .spawn(seed)
        {
            tracing::debug!(%error, "cannot start the random generator's warm-up thread");
        }
    });
    started
}

impl TlsSettings {
    /// Configuration for the accepting side: client certificates are mandatory.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TransportError> {
        let provider = crypto_provider();
        let client_verifier: Arc<dyn ClientCertVerifier> = match &self.trust {
            PeerTrust::PinnedFingerprints(fingerprints) => {
                Arc::new(PinnedCertificateVerifier::new(
                    fingerprints.clone(),
                    provider.signature_verification_algorithms,
                )?)
            }
            PeerTrust::ClusterCertificateAuthority { root_certificates } => {
                WebPkiClientVerifier::builder_with_provider(
                    Arc::new(root_store(root_certificates)?),
                    provider.clone(),
                )
                .build()
                .map_err(|error| TransportError::TlsConfiguration {
                    reason: format!("client verifier: {error}"),
                })?
            }
        };
        let config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_configuration_error)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(
                self.identity.certificate_chain().to_vec(),
                self.identity.private_key(),
            )
            .map_err(tls_configuration_error)?;
        Ok(Arc::new(config))
    }

    /// Configuration for the dialing side: presents this host's certificate.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TransportError> {
        let provider = crypto_provider();
        let server_verifier: Arc<dyn ServerCertVerifier> = match &self.trust {
            PeerTrust::PinnedFingerprints(fingerprints) => {
                Arc::new(PinnedCertificateVerifier::new(
                    fingerprints.clone(),
                    provider.signature_verification_algorithms,
                )?)
            }
            PeerTrust::ClusterCertificateAuthority { root_certificates } => {
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(root_store(root_certificates)?),
                    provider.clone(),
                )
                .build()
                .map_err(|error| TransportError::TlsConfiguration {
                    reason: format!("server verifier: {error}"),
                })?
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_configuration_error)?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(
                self.identity.certificate_chain().to_vec(),
                self.identity.private_key(),
            )
            .map_err(tls_configuration_error)?;
        Ok(Arc::new(config))
    }
}

fn tls_configuration_error(error: rustls::Error) -> TransportError {
    TransportError::TlsConfiguration {
        reason: error.to_string(),
    }
}

fn root_store(
    root_certificates: &[CertificateDer<'static>],
) -> Result<RootCertStore, TransportError> {
    let mut store = RootCertStore::empty();
    for certificate in root_certificates {
        store
            .add(certificate.clone())
            .map_err(tls_configuration_error)?;
    }
    if store.is_empty() {
        return Err(TransportError::TlsConfiguration {
            reason: "no cluster ca root certificate given".to_string(),
        });
    }
    Ok(store)
}

/// Accepts a peer certificate only if its fingerprint is one of the pinned ones; checks handshake
/// signatures with the provider's algorithms. Used on both sides of the connection.
pub struct PinnedCertificateVerifier {
    pinned: Vec<Fingerprint>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for PinnedCertificateVerifier {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PinnedCertificateVerifier")
            .field("pinned", &self.pinned)
            .finish()
    }
}

impl PinnedCertificateVerifier {
    pub fn new(
        pinned: Vec<Fingerprint>,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Result<PinnedCertificateVerifier, TransportError> {
        if pinned.is_empty() {
            return Err(TransportError::TlsConfiguration {
                reason: "no pinned peer fingerprint given".to_string(),
            });
        }
        Ok(PinnedCertificateVerifier { pinned, algorithms })
    }

    fn check_pinned(&self, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let fingerprint = Fingerprint::of_certificate(end_entity.as_ref());
        if self.pinned.contains(&fingerprint) {
            Ok(())
        } else {
            tracing::warn!(%fingerprint, "peer certificate is not pinned");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for PinnedCertificateVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_pinned(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, certificate, signature, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for PinnedCertificateVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check_pinned(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, certificate, signature, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, certificate, signature, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_random_generator_is_warmed_up_once() {
        warm_up_random();
        assert!(!warm_up_random(), "a second call starts nothing");
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).expect("random bytes after the warm-up");
        assert_ne!(bytes, [0u8; 32]);
    }
}
