//! A peer that sends corrupt or malformed frames fails the session with a clear error; nothing it
//! sent reaches the application.

mod common;

use common::*;
use novacron_transport::frame::{
    Channel, ConnectionPurpose, FrameHeader, FrameKind, HELLO_LEN, Hello, HelloStatus, frame_tag,
};
use novacron_transport::tls::PINNED_SERVER_NAME;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a session by hand and sends `frame_bytes` on its control connection; returns the error
/// the listener's application sees.
async fn send_raw_frame(frame_bytes: Vec<u8>) -> String {
    let (listener_tls, dialer_tls) = pinned_pair();
    let listener = listen(&listener_tls, test_options(1)).await;
    let connector = tokio_rustls::TlsConnector::from(dialer_tls.client_config().unwrap());
    let tcp = TcpStream::connect(listener.local_addr()).await.unwrap();
    let mut stream = connector
        .connect(ServerName::try_from(PINNED_SERVER_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let hello = Hello {
        code: ConnectionPurpose::OpenSession as u8,
        session_id: [5; 16],
        connection_index: 0,
        bulk_receive_window: 1 << 20,
        control_receive_window: 4 << 20,
    };
    stream.write_all(&hello.encode()).await.unwrap();
    stream.flush().await.unwrap();
    let mut reply = [0u8; HELLO_LEN];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(
        Hello::decode(&reply).unwrap().status(),
        HelloStatus::Accepted
    );
    let accepted = listener.accept().await.unwrap();
    // The listener may reset the connection before it has read everything: that is the point.
    let _ = stream.write_all(&frame_bytes).await;
    let _ = stream.flush().await;
    let error = accepted.recv().await.unwrap_err().to_string();
    // Keep the raw stream open until the session has failed, so the failure is the frame's doing.
    drop(stream);
    error
}

fn data_frame(sequence: u64, payload: &[u8]) -> (FrameHeader, Vec<u8>) {
    let header = FrameHeader {
        kind: FrameKind::Data,
        channel: Channel::Bulk,
        end_of_stream: false,
        payload_len: payload.len() as u32,
        sequence,
    };
    let mut bytes = header.encode().to_vec();
    bytes.extend_from_slice(payload);
    bytes.extend_from_slice(&frame_tag(&header.encode(), payload));
    (header, bytes)
}

#[tokio::test]
async fn a_frame_with_a_wrong_integrity_tag_fails_the_session() {
    init_tracing();
    within(async {
        let (_, mut bytes) = data_frame(0, b"some payload");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        let error = send_raw_frame(bytes).await;
        assert!(error.contains("integrity"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn a_frame_announcing_a_huge_payload_fails_the_session_without_allocating_it() {
    init_tracing();
    within(async {
        let (_, mut bytes) = data_frame(0, b"x");
        bytes[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        let error = send_raw_frame(bytes).await;
        assert!(error.contains("exceeds"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn a_frame_of_unknown_kind_fails_the_session() {
    init_tracing();
    within(async {
        let (_, mut bytes) = data_frame(0, b"x");
        bytes[0] = 77;
        let error = send_raw_frame(bytes).await;
        assert!(error.contains("unknown frame kind"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn frames_beyond_the_receive_window_fail_the_session() {
    init_tracing();
    within(async {
        // Frames of 1 MiB, never acked, eight beyond the listener's bulk receive window.
        let payload = vec![0u8; 1 << 20];
        let mut bytes = Vec::new();
        for sequence in 1..=(novacron_transport::DEFAULT_BULK_WINDOW_BYTES >> 20) + 8 {
            bytes.extend_from_slice(&data_frame(sequence, &payload).1);
        }
        let error = send_raw_frame(bytes).await;
        assert!(error.contains("receive window"), "{error}");
    })
    .await;
}

#[tokio::test]
async fn an_acknowledgement_of_unsent_data_fails_the_session() {
    init_tracing();
    within(async {
        let header = FrameHeader {
            kind: FrameKind::Ack,
            channel: Channel::Bulk,
            end_of_stream: false,
            payload_len: 16,
            sequence: 0,
        };
        let ack = novacron_transport::frame::Acknowledgement {
            contiguous_sequence: 1000,
            consumed_bytes: 0,
        }
        .encode();
        let mut bytes = header.encode().to_vec();
        bytes.extend_from_slice(&ack);
        bytes.extend_from_slice(&frame_tag(&header.encode(), &ack));
        let error = send_raw_frame(bytes).await;
        assert!(error.contains("beyond"), "{error}");
    })
    .await;
}
