//! The joining host's side of `novacron cluster join ADDR --token T`, before it has a
//! certificate: dial a member's cluster listener without a client certificate, verify that the
//! member's certificate chains to the CA the token pins (the joiner has no CA certificate yet: it
//! takes the one the member presents and accepts it only by fingerprint), send the CSR and the
//! token, and receive the signed certificate.
//!
//! Then, with its new identity, the host opens its store (`Bootstrap::JoinExisting`), serves its
//! listener, and asks the admitting member to add it as a learner
//! ([`crate::MtlsRaftTransport::add_learner_via`]). The voter policy promotes it later.

use std::sync::Arc;
use std::time::Duration;

use novacron_transport::Fingerprint;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::{ClusterError, Result};
use crate::identity::{NodeEnrolment, NodeIdentity, node_id_of_certificate, node_server_name};
use crate::join::{JoinGrant, JoinRequest, JoinToken};
use crate::transport::read_frame;
use crate::wire::{Frame, Request};

/// Accepts a member's certificate only if its chain holds the pinned CA and verifies against it
/// for the node name the leaf carries.
#[derive(Debug)]
struct PinnedCaVerifier {
    pinned: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let refuse = |reason: &str| {
            tracing::warn!(reason, "cluster member certificate refused while joining");
            rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )
        };
        let ca = intermediates
            .iter()
            .find(|certificate| Fingerprint::of_certificate(certificate.as_ref()) == self.pinned)
            .ok_or_else(|| refuse("the member did not present the ca the join token pins"))?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|_| refuse("the pinned ca certificate is unusable"))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|_| refuse("cannot build a verifier for the pinned ca"))?;
        let node_id = node_id_of_certificate(end_entity.as_ref())
            .map_err(|_| refuse("the member certificate names no node"))?;
        let name = ServerName::try_from(node_server_name(node_id))
            .map_err(|_| refuse("invalid node name"))?;
        verifier.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Asks the member at `address` to admit this host. `raft_address` is where this host's
/// listener will be reachable (bind it first to know it).
pub async fn request_join(
    address: &str,
    token: &JoinToken,
    enrolment: &NodeEnrolment,
    host_name: &str,
    raft_address: &str,
    timeout: Duration,
) -> Result<JoinGrant> {
    let unreachable =
        |source: Box<dyn std::error::Error + Send + Sync>| ClusterError::PeerUnreachable {
            node_id: 0,
            address: address.to_string(),
            source,
        };
    let provider = novacron_transport::tls::crypto_provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| ClusterError::Tls {
            source: novacron_transport::TransportError::TlsConfiguration {
                reason: error.to_string(),
            },
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier {
            pinned: token.ca_fingerprint,
            provider,
        }))
        .with_no_client_auth();
    let exchange = async {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|error| unreachable(Box::new(error)))?;
        // The name is not checked against the member's certificate (the joiner does not know the
        // member's node id); the verifier checks the chain and the node name the leaf carries.
        let server_name = ServerName::try_from(node_server_name(0))
            .map_err(|error| unreachable(Box::new(error)))?;
        let mut tls = TlsConnector::from(Arc::new(config))
            .connect(server_name, tcp)
            .await
            .map_err(|error| unreachable(Box::new(error)))?;
        let request = JoinRequest {
            token: token.to_string(),
            csr_pem: enrolment.csr_pem().to_string(),
            host_name: host_name.to_string(),
            raft_address: raft_address.to_string(),
        };
        let failed = |reason: String| ClusterError::PeerFailed {
            request: "join",
            node_id: 0,
            address: address.to_string(),
            source: Box::new(crate::transport::Reason(reason)),
        };
        let bytes = Frame::Request {
            id: 1,
            request: Request::Join(request),
        }
        .encode()
        .map_err(|error| failed(error.to_string()))?;
        tls.write_all(&bytes)
            .await
            .map_err(|error| failed(error.to_string()))?;
        tls.flush()
            .await
            .map_err(|error| failed(error.to_string()))?;
        match read_frame(&mut tls).await {
            Ok(Some(Frame::Reply { body, .. })) => serde_json::from_slice::<JoinGrant>(&body)
                .map_err(|error| failed(format!("the join grant could not be decoded: {error}"))),
            Ok(Some(Frame::Error { failure, .. })) => Err(ClusterError::PeerRefused {
                request: "join",
                node_id: 0,
                message: failure.to_string(),
            }),
            Ok(_) => Err(failed(
                "the member closed the connection without an answer".into(),
            )),
            Err(error) => Err(failed(error.to_string())),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(unreachable(Box::new(crate::transport::Reason(format!(
            "no join answer within {timeout:?}"
        ))))),
    }
}

/// Joins in one step: enrols (CSR), asks `address` to admit this host, and returns the new
/// identity (its node id inside) and the grant.
pub async fn enrol(
    address: &str,
    token_text: &str,
    host_name: &str,
    raft_address: &str,
    timeout: Duration,
) -> Result<(NodeIdentity, JoinGrant)> {
    let token: JoinToken = token_text.parse()?;
    let enrolment = NodeEnrolment::new()?;
    let grant = request_join(
        address,
        &token,
        &enrolment,
        host_name,
        raft_address,
        timeout,
    )
    .await?;
    let identity = enrolment.complete(
        &grant.certificate_pem,
        &grant.ca_certificate_pem,
        token.ca_fingerprint,
    )?;
    if identity.node_id() != grant.node_id {
        return Err(ClusterError::Certificate {
            action: "complete enrolment",
            reason: format!(
                "the certificate names node {} but the grant says {}",
                identity.node_id(),
                grant.node_id
            ),
        });
    }
    Ok((identity, grant))
}
