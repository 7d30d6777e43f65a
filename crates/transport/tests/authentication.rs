//! No unauthenticated byte is accepted: wrong fingerprints, missing client certificates, foreign
//! CAs and stolen session ids are all refused; the cluster-CA path works.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use novacron_transport::frame::{ConnectionPurpose, HELLO_LEN, Hello, HelloStatus};
use novacron_transport::tls::{PINNED_SERVER_NAME, PinnedCertificateVerifier, crypto_provider};
use novacron_transport::{
    ClusterCertificateAuthority, HostIdentity, PeerTrust, Session, TlsSettings, TransportError,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn dialer_refuses_a_listener_whose_fingerprint_is_not_pinned() {
    init_tracing();
    within(async {
        let (listener_tls, mut dialer_tls) = pinned_pair();
        let impostor = HostIdentity::generate_self_signed("listener").unwrap();
        dialer_tls.trust = PeerTrust::PinnedFingerprints(vec![impostor.fingerprint()]);
        let listener = listen(&listener_tls, test_options(1)).await;
        let error = Session::connect(listener.local_addr(), &dialer_tls, test_options(1))
            .await
            .unwrap_err();
        assert!(matches!(error, TransportError::Handshake { .. }), "{error}");
        wait_until(
            "the listener to count the refusal",
            Duration::from_secs(10),
            || listener.stats().connections_refused >= 1,
        )
        .await;
        assert_eq!(listener.stats().sessions_opened, 0);
    })
    .await;
}

#[tokio::test]
async fn listener_refuses_a_dialer_whose_fingerprint_is_not_pinned() {
    init_tracing();
    within(async {
        let (listener_tls, mut dialer_tls) = pinned_pair();
        // Same pins on the dialer side, but a certificate the listener never pinned.
        dialer_tls.identity = HostIdentity::generate_self_signed("dialer").unwrap();
        let listener = listen(&listener_tls, test_options(1)).await;
        let error = refused_at_open(listener.local_addr(), &dialer_tls, test_options(1)).await;
        assert!(
            matches!(
                error,
                TransportError::Handshake { .. } | TransportError::Io { .. }
            ),
            "{error}"
        );
        wait_until(
            "the listener to count the refusal",
            Duration::from_secs(10),
            || listener.stats().connections_refused >= 1,
        )
        .await;
        assert_eq!(listener.stats().sessions_opened, 0);
    })
    .await;
}

fn client_config_without_certificate(pinned_server: &HostIdentity) -> Arc<rustls::ClientConfig> {
    let provider = crypto_provider();
    let verifier = PinnedCertificateVerifier::new(
        vec![pinned_server.fingerprint()],
        provider.signature_verification_algorithms,
    )
    .unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth(),
    )
}

#[tokio::test]
async fn a_client_without_certificate_gets_nothing_through() {
    init_tracing();
    within(async {
        let (listener_tls, _) = pinned_pair();
        let listener = listen(&listener_tls, test_options(1)).await;
        let connector = tokio_rustls::TlsConnector::from(client_config_without_certificate(
            &listener_tls.identity,
        ));
        let tcp = TcpStream::connect(listener.local_addr()).await.unwrap();
        let name = ServerName::try_from(PINNED_SERVER_NAME).unwrap();
        // TLS 1.3 lets the client finish its side before the server checks; the refusal shows
        // on the first exchange.
        let outcome = async {
            let mut stream = connector.connect(name, tcp).await?;
            let hello = Hello {
                code: ConnectionPurpose::OpenSession as u8,
                session_id: [1; 16],
                connection_index: 0,
                bulk_receive_window: 1 << 20,
                control_receive_window: 1 << 20,
            };
            stream.write_all(&hello.encode()).await?;
            stream.flush().await?;
            let mut reply = [0u8; HELLO_LEN];
            stream.read_exact(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        }
        .await;
        assert!(
            outcome.is_err(),
            "server answered an unauthenticated client"
        );
        wait_until(
            "the listener to count the refusal",
            Duration::from_secs(10),
            || listener.stats().connections_refused >= 1,
        )
        .await;
        assert_eq!(listener.stats().sessions_opened, 0);
    })
    .await;
}

#[tokio::test]
async fn a_connection_closed_before_a_byte_is_abandoned_not_refused() {
    init_tracing();
    within(async {
        let (listener_tls, dialer_tls) = pinned_pair();
        let listener = listen(&listener_tls, test_options(1)).await;
        // A dialer's spare attempt that lost (or a port check): connects, sends nothing, closes.
        drop(TcpStream::connect(listener.local_addr()).await.unwrap());
        wait_until(
            "the listener to count the abandoned connection",
            Duration::from_secs(10),
            || listener.stats().connections_abandoned >= 1,
        )
        .await;
        assert_eq!(listener.stats().connections_refused, 0);
        // Garbage is still a refusal.
        let mut garbage = TcpStream::connect(listener.local_addr()).await.unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        wait_until(
            "the listener to refuse garbage",
            Duration::from_secs(10),
            || listener.stats().connections_refused >= 1,
        )
        .await;
        // And a real session still opens.
        let dialer = Session::connect(listener.local_addr(), &dialer_tls, test_options(1))
            .await
            .unwrap();
        let _accepted = listener.accept().await.unwrap();
        assert_eq!(listener.stats().sessions_opened, 1);
        dialer.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn cluster_ca_identities_connect_and_a_foreign_ca_is_refused() {
    init_tracing();
    within(async {
        let authority = ClusterCertificateAuthority::generate("test").unwrap();
        let trust = PeerTrust::ClusterCertificateAuthority {
            root_certificates: vec![authority.root_certificate().clone()],
        };
        let listener_tls = TlsSettings {
            identity: authority.issue_host_identity("host-b.cluster").unwrap(),
            trust: trust.clone(),
        };
        let dialer_tls = TlsSettings {
            identity: authority.issue_host_identity("host-a.cluster").unwrap(),
            trust: trust.clone(),
        };
        let listener = listen(&listener_tls, test_options(2)).await;
        let options = novacron_transport::SessionOptions {
            server_name: "host-b.cluster".to_string(),
            ..test_options(2)
        };
        let dialer = Session::connect(listener.local_addr(), &dialer_tls, options.clone())
            .await
            .unwrap();
        let accepted = listener.accept().await.unwrap();
        dialer.opened().await.unwrap();
        accepted.opened().await.unwrap();
        dialer
            .send(Bytes::from_static(b"signed by the cluster"))
            .await
            .unwrap();
        dialer.finish().await.unwrap();
        assert_eq!(
            accepted.recv().await.unwrap().unwrap(),
            Bytes::from_static(b"signed by the cluster")
        );
        assert_eq!(accepted.recv().await.unwrap(), None);

        // Wrong server name: refused by the dialer.
        let wrong_name = novacron_transport::SessionOptions {
            server_name: "host-c.cluster".to_string(),
            ..options.clone()
        };
        assert!(
            Session::connect(listener.local_addr(), &dialer_tls, wrong_name)
                .await
                .is_err()
        );
        // A host of another cluster: refused by the listener.
        let foreign = ClusterCertificateAuthority::generate("other").unwrap();
        let foreign_tls = TlsSettings {
            identity: foreign.issue_host_identity("host-x.cluster").unwrap(),
            trust,
        };
        let refused_before = listener.stats().connections_refused;
        refused_at_open(listener.local_addr(), &foreign_tls, options).await;
        wait_until(
            "the listener to count the refusal",
            Duration::from_secs(10),
            || listener.stats().connections_refused > refused_before,
        )
        .await;
        assert_eq!(listener.stats().sessions_opened, 1);
    })
    .await;
}

#[tokio::test]
async fn a_session_id_is_only_accepted_from_the_peer_that_opened_it() {
    init_tracing();
    within(async {
        let listener_identity = HostIdentity::generate_self_signed("listener").unwrap();
        let owner = HostIdentity::generate_self_signed("owner").unwrap();
        let other = HostIdentity::generate_self_signed("other").unwrap();
        let listener_tls = TlsSettings {
            identity: listener_identity.clone(),
            trust: PeerTrust::PinnedFingerprints(vec![owner.fingerprint(), other.fingerprint()]),
        };
        let pin_listener = PeerTrust::PinnedFingerprints(vec![listener_identity.fingerprint()]);
        let owner_tls = TlsSettings {
            identity: owner,
            trust: pin_listener.clone(),
        };
        let other_tls = TlsSettings {
            identity: other,
            trust: pin_listener,
        };
        let listener = listen(&listener_tls, test_options(1)).await;
        let session = Session::connect(listener.local_addr(), &owner_tls, test_options(1))
            .await
            .unwrap();
        let _accepted = listener.accept().await.unwrap();
        // The other host is trusted, but it did not open this session.
        let connector = tokio_rustls::TlsConnector::from(other_tls.client_config().unwrap());
        let tcp = TcpStream::connect(listener.local_addr()).await.unwrap();
        let mut stream = connector
            .connect(ServerName::try_from(PINNED_SERVER_NAME).unwrap(), tcp)
            .await
            .unwrap();
        for purpose in [ConnectionPurpose::Bulk] {
            let hello = Hello {
                code: purpose as u8,
                session_id: session.session_id(),
                connection_index: 9,
                bulk_receive_window: 1 << 20,
                control_receive_window: 1 << 20,
            };
            stream.write_all(&hello.encode()).await.unwrap();
            stream.flush().await.unwrap();
            let mut reply = [0u8; HELLO_LEN];
            stream.read_exact(&mut reply).await.unwrap();
            let reply = Hello::decode(&reply).unwrap();
            assert_eq!(reply.status(), HelloStatus::UnknownSession);
        }
        assert_eq!(listener.stats().sessions_opened, 1);
    })
    .await;
}
