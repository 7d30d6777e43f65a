//! The sending side of a transfer: chunks and encodes the image file with the codec (on a
//! blocking thread), asks the receiver which chunks it holds before each frame, puts frames on
//! the bulk stream, then asks the receiver to verify and store the image. It must not write
//! anything on this host: a failed send leaves this host as it was.

use super::protocol::{self, Failure, Message, VerifyReply};
use super::{Transfer, TransferFailure, TransferService, close_quietly, describe};
use crate::links::LinkMonitor;
use novacron_bandwidth::ForecastHorizon;
use novacron_codec::level::FALLBACK_LEVEL;
use novacron_codec::{
    BoxError, ChunkEncoder, ChunkEncoderConfig, ChunkStats, ContentHash, LevelMeter,
    RemoteHashQuery,
};
use novacron_transport::{ControlChannel, ControlIncoming, Fingerprint, Session};
use novacron_types::ErrorCode;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The level of a probe frame: the fastest the meter knows, so the link, not the compressor, is
/// the limit.
const PROBE_LEVEL: i32 = 1;

/// Input bytes per frame: one hash question and one durable commit at the receiver per frame.
const FRAME_INPUT_TARGET: usize = 8 << 20;

/// Answers the encoder's "which of these do you hold?" over the control channel.
struct SessionHashQuery {
    handle: Handle,
    control: ControlChannel,
    stop: CancellationToken,
}

impl RemoteHashQuery for SessionHashQuery {
    fn which_of(&mut self, hashes: &[ContentHash]) -> Result<Vec<bool>, BoxError> {
        let mut answers = Vec::with_capacity(hashes.len());
        for batch in hashes.chunks(protocol::MAX_QUESTION_HASHES) {
            let question = Message::WhichOf(batch.to_vec()).encode();
            let answer = self.handle.block_on(async {
                tokio::select! {
                    answer = self.control.request(question) => answer.map_err(BoxError::from),
                    () = self.stop.cancelled() => Err("stopped".into()),
                }
            })?;
            match Message::decode(&answer)? {
                Message::WhichOfAnswer(held) if held.len() == batch.len() => answers.extend(held),
                other => {
                    return Err(format!(
                        "expected {} hash answers, the receiver sent {}",
                        batch.len(),
                        other.name()
                    )
                    .into());
                }
            }
        }
        Ok(answers)
    }
}

/// Counts the bytes the encoder has read: the raw progress of the transfer.
struct CountingReader<R> {
    inner: R,
    transfer: Arc<Transfer>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let count = self.inner.read(buffer)?;
        self.transfer
            .raw_bytes_done
            .fetch_add(count as u64, Ordering::Relaxed);
        Ok(count)
    }
}

/// Sends the image at `path`; returns once the receiver verified and stored it.
pub(crate) async fn send_image(
    service: &Arc<TransferService>,
    session: Arc<Session>,
    transfer: Arc<Transfer>,
    path: PathBuf,
) -> Result<(), TransferFailure> {
    let control = session.control();
    // Stops the encoder: the user cancelled, or the receiver gave up (its reason is kept).
    let stop = transfer.cancel.child_token();
    let peer_failure: Arc<Mutex<Option<Failure>>> = Arc::new(Mutex::new(None));
    let watcher = tokio::spawn(watch_for_abort(
        control.clone(),
        stop.clone(),
        peer_failure.clone(),
    ));
    let links = service.links.clone();
    let result = send_and_verify(&session, &transfer, links, path, &control, &stop).await;
    watcher.abort();
    let peer_failure = peer_failure
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let result = match (result, peer_failure) {
        (Err(_), Some(failure)) => Err(TransferFailure::new(
            failure.code,
            format!("the destination gave up: {}", failure.message),
        )),
        (Err(_), None) if transfer.cancel.is_cancelled() => {
            let abort = Message::Abort(Failure {
                code: ErrorCode::Conflict,
                message: "the sender cancelled the transfer".into(),
            });
            let _ =
                tokio::time::timeout(Duration::from_secs(2), control.notify(abort.encode())).await;
            Err(TransferFailure::cancelled())
        }
        (result, _) => result,
    };
    close_quietly(session).await;
    result
}

async fn send_and_verify(
    session: &Arc<Session>,
    transfer: &Arc<Transfer>,
    links: Arc<LinkMonitor>,
    path: PathBuf,
    control: &ControlChannel,
    stop: &CancellationToken,
) -> Result<(), TransferFailure> {
    let handle = Handle::current();
    let encoder_session = session.clone();
    let encoder_transfer = transfer.clone();
    let encoder_stop = stop.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let level_policy = LevelPolicy::new(links, encoder_session.peer_fingerprint());
        encode_file(
            &handle,
            &encoder_session,
            &encoder_transfer,
            level_policy,
            &path,
            &encoder_stop,
        )
    })
    .await
    .map_err(|error| {
        TransferFailure::new(
            ErrorCode::Internal,
            format!("encoder thread failed: {error}"),
        )
    })?;
    encoded?;
    let finish = async {
        session
            .finish()
            .await
            .map_err(|error| TransferFailure::session(&error))?;
        let answer = control
            .request(Message::Verify.encode())
            .await
            .map_err(|error| TransferFailure::session(&error))?;
        match Message::decode(&answer)? {
            Message::VerifyReply(VerifyReply::Stored { .. }) => Ok(()),
            Message::VerifyReply(VerifyReply::Failed { code, message }) => {
                Err(TransferFailure::new(
                    code,
                    format!("the destination did not store the image: {message}"),
                ))
            }
            other => Err(TransferFailure::from(protocol::ProtocolError::Unexpected {
                expected: "verify reply",
                got: other.name(),
            })),
        }
    };
    tokio::select! {
        result = finish => result,
        () = stop.cancelled() => Err(TransferFailure::cancelled()),
    }
}

fn encode_file(
    handle: &Handle,
    session: &Arc<Session>,
    transfer: &Arc<Transfer>,
    mut level_policy: LevelPolicy,
    path: &std::path::Path,
    stop: &CancellationToken,
) -> Result<(), TransferFailure> {
    let file = std::fs::File::open(path).map_err(|error| {
        TransferFailure::new(
            ErrorCode::Internal,
            format!("cannot read image file {}: {error}", path.display()),
        )
    })?;
    let reader = CountingReader {
        inner: std::io::BufReader::with_capacity(1 << 20, file),
        transfer: transfer.clone(),
    };
    let query = SessionHashQuery {
        handle: handle.clone(),
        control: session.control(),
        stop: stop.clone(),
    };
    let config = ChunkEncoderConfig {
        frame_input_target: FRAME_INPUT_TARGET,
        ..ChunkEncoderConfig::default()
    };
    let mut encoder = ChunkEncoder::new(config, query).map_err(|error| {
        TransferFailure::new(ErrorCode::Internal, format!("codec: {}", describe(&error)))
    })?;
    let choose_level = |stats: &ChunkStats| {
        let level = level_policy.next_frame_level(stats);
        transfer.zstd_level.store(level, Ordering::Relaxed);
        level
    };
    let outcome = encoder.encode_reader_choosing_level(reader, choose_level, |frame| {
        let data = protocol::bulk_frame(frame);
        let length = data.len() as u64;
        handle.block_on(async {
            tokio::select! {
                sent = session.send(data) => sent.map_err(BoxError::from),
                () = stop.cancelled() => Err("stopped".into()),
            }
        })?;
        transfer.wire_bytes.fetch_add(length, Ordering::Relaxed);
        Ok(())
    });
    match outcome {
        Ok(()) => Ok(()),
        Err(_) if stop.is_cancelled() => Err(TransferFailure::cancelled()),
        Err(error) => {
            let text = describe(&error);
            let session_error = session_failure_in(&error);
            Err(session_error.unwrap_or_else(|| {
                TransferFailure::new(ErrorCode::Internal, format!("encoding the image: {text}"))
            }))
        }
    }
}

/// Chooses each frame's zstd level from the link's 1 s forecast against the measured speed and
/// ratio of each level (as the transfer's own frames show them): a fast level when the link is
/// fast, a harder one when it is slow (see `novacron_codec::choose_zstd_level`). Before the link
/// has a forecast the codec's fallback level is used; when the link asks for a probe (this
/// sender could not keep it busy for a while, so its rate is unknown), one frame goes at the
/// fastest level.
struct LevelPolicy {
    links: Arc<LinkMonitor>,
    peer: Fingerprint,
    meter: LevelMeter,
    previous: Option<(i32, ChunkStats)>,
}

impl LevelPolicy {
    fn new(links: Arc<LinkMonitor>, peer: Fingerprint) -> Self {
        Self {
            links,
            peer,
            meter: LevelMeter::new(),
            previous: None,
        }
    }

    fn next_frame_level(&mut self, stats: &ChunkStats) -> i32 {
        // What the previous frame's level achieved on its literal bytes.
        if let Some((level, before)) = &self.previous {
            self.meter.observe(
                *level,
                (stats.literal_bytes - before.literal_bytes) as usize,
                (stats.frame_bytes - before.frame_bytes) as usize,
                stats
                    .compression_time
                    .saturating_sub(before.compression_time),
            );
        }
        let level = if self.links.take_probe_request(self.peer) {
            PROBE_LEVEL
        } else {
            match self.links.forecast(self.peer, ForecastHorizon::OneSecond) {
                Some(forecast) => self.meter.choose(forecast.expected_bits_per_sec / 8.0, 1),
                None => FALLBACK_LEVEL,
            }
        };
        tracing::debug!(peer = %self.peer, level, "zstd level for the next frame");
        self.previous = Some((level, stats.clone()));
        level
    }
}

/// A transport error somewhere in the encoder's error chain, as a transfer failure.
fn session_failure_in(error: &(dyn std::error::Error + 'static)) -> Option<TransferFailure> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(transport) = error.downcast_ref::<novacron_transport::TransportError>() {
            return Some(TransferFailure::session(transport));
        }
        current = error.source();
    }
    None
}

/// Watches the control channel for the receiver's abort and stops the encoder when it comes.
async fn watch_for_abort(
    control: ControlChannel,
    stop: CancellationToken,
    failure: Arc<Mutex<Option<Failure>>>,
) {
    loop {
        match control.next_incoming().await {
            Ok(Some(ControlIncoming::Notification(body))) => {
                if let Ok(Message::Abort(abort)) = Message::decode(&body) {
                    *failure
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(abort);
                    stop.cancel();
                    return;
                }
            }
            Ok(Some(ControlIncoming::Request(request))) => {
                let reply = Message::Abort(Failure {
                    code: ErrorCode::Internal,
                    message: "the sending side answers no requests".into(),
                });
                let _ = request.respond(reply.encode()).await;
            }
            Ok(None) | Err(_) => return,
        }
    }
}
