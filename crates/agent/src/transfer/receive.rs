//! The receiving side of a transfer: answers the sender's hash questions from the chunk store,
//! decodes frames from the bulk stream into a staging file (keeping every new chunk in the chunk
//! store as each frame completes, which is what makes a rerun after a failure cheap), and on
//! `Verify` checks size, BLAKE3 and qemu-img before the image is moved into the image store and
//! its record written. A failure anywhere removes the staging file; no record is written.

use super::protocol::{self, Failure, FrameSplitter, ImageOffer, Message, VerifyReply};
use super::{Transfer, TransferFailure, TransferService, describe, is_disk_full};
use crate::images::StagedFile;
use novacron_codec::{ChunkDecoder, ChunkDecoderConfig, ChunkStore, ContentHash, StoreRepository};
use novacron_transport::{ControlIncoming, Session};
use novacron_types::ErrorCode;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc;

type Decoded = (StagedFile, blake3::Hash, u64);

/// Receives the offered image; returns the success message.
pub(crate) async fn receive_image(
    service: &Arc<TransferService>,
    session: Arc<Session>,
    transfer: Arc<Transfer>,
    offer: ImageOffer,
) -> Result<String, TransferFailure> {
    let control = session.control();
    let result = receive_and_store(service, &session, &transfer, &offer).await;
    if let Err(failure) = &result {
        // Tell the sender why, so it stops at once and shows the reason.
        let abort = Message::Abort(Failure {
            code: failure.code,
            message: if *failure == TransferFailure::cancelled() {
                "the receiver cancelled the transfer".into()
            } else {
                failure.message.clone()
            },
        });
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            control.notify(abort.encode()).await?;
            session.flush().await
        })
        .await;
    }
    super::close_quietly(session).await;
    result
}

async fn receive_and_store(
    service: &Arc<TransferService>,
    session: &Arc<Session>,
    transfer: &Arc<Transfer>,
    offer: &ImageOffer,
) -> Result<String, TransferFailure> {
    let chunks = service.chunks().clone();
    // Chunks kept frame by frame belong to no manifest until the image is stored and indexed.
    let _pin = crate::images::pin_chunks(&chunks).await;
    let staged = StagedFile::in_staging(&service.host.paths);
    let host_name = service.host.config.host_name.clone();
    let mut decode_task = tokio::spawn(decode_stream(
        session.clone(),
        transfer.clone(),
        chunks.clone(),
        staged,
        offer.size,
        host_name,
    ));
    let control = session.control();
    let mut decoded: Option<Decoded> = None;
    let mut pending_verify: Option<novacron_transport::ControlRequest> = None;
    let cancel = transfer.cancel.clone();
    let result = loop {
        if decoded.is_some()
            && let Some(request) = pending_verify.take()
        {
            let Some((mut staged, hash, length)) = decoded.take() else {
                continue;
            };
            let stored = verify_and_store(service, offer, &mut staged, hash, length).await;
            let reply = match &stored {
                Ok(record) => VerifyReply::Stored {
                    name: record.name.to_string(),
                    id: record.id.clone(),
                },
                Err(failure) => VerifyReply::Failed {
                    code: failure.code,
                    message: failure.message.clone(),
                },
            };
            let _ = request.respond(Message::VerifyReply(reply).encode()).await;
            let _ = tokio::time::timeout(Duration::from_secs(5), session.flush()).await;
            break match stored {
                Ok(record) => Ok(format!("stored as image {:?}", record.name.as_str())),
                // The sender has the reason now; nothing more to tell it.
                Err(failure) => return Err(failure),
            };
        }
        tokio::select! {
            incoming = control.next_incoming() => {
                let request = match incoming {
                    Ok(Some(ControlIncoming::Request(request))) => request,
                    Ok(Some(ControlIncoming::Notification(body))) => {
                        match Message::decode(&body) {
                            Ok(Message::Abort(failure)) => break Err(TransferFailure::new(
                                failure.code,
                                format!("the sender gave up: {}", failure.message),
                            )),
                            _ => continue,
                        }
                    }
                    Ok(None) => break Err(TransferFailure::new(
                        ErrorCode::Unavailable,
                        "the sender closed the session before the image was complete",
                    )),
                    Err(error) => break Err(TransferFailure::session(&error)),
                };
                match Message::decode(&request.body) {
                    Ok(Message::WhichOf(hashes)) => {
                        let answer = which_of(&chunks, hashes).await;
                        if let Err(error) = request.respond(Message::WhichOfAnswer(answer).encode()).await {
                            break Err(TransferFailure::session(&error));
                        }
                    }
                    Ok(Message::Verify) => {
                        // Answered once the last frame is decoded; until then keep watching for
                        // an abort or a cancel.
                        pending_verify = Some(request);
                    }
                    Ok(other) => {
                        break Err(TransferFailure::from(protocol::ProtocolError::Unexpected {
                            expected: "hash question or verify",
                            got: other.name(),
                        }))
                    }
                    Err(error) => break Err(TransferFailure::from(error)),
                }
            }
            finished = &mut decode_task, if decoded.is_none() => {
                match flatten(finished) {
                    Ok(done) => decoded = Some(done),
                    Err(failure) => break Err(failure),
                }
            }
            () = cancel.cancelled() => break Err(TransferFailure::cancelled()),
        }
    };
    // On failure the decode task may still run: stop it; dropping its staged file removes it.
    decode_task.abort();
    drop(decoded);
    result
}

fn flatten(
    joined: Result<Result<Decoded, TransferFailure>, tokio::task::JoinError>,
) -> Result<Decoded, TransferFailure> {
    joined.map_err(|error| {
        TransferFailure::new(ErrorCode::Internal, format!("decoder task failed: {error}"))
    })?
}

async fn which_of(chunks: &Arc<ChunkStore>, hashes: Vec<ContentHash>) -> Vec<bool> {
    let count = hashes.len();
    let chunks = chunks.clone();
    match tokio::task::spawn_blocking(move || chunks.which_of(&hashes)).await {
        Ok(Ok(answers)) => answers,
        // A wrong "no" only costs bytes; a wrong "yes" would break the transfer.
        Ok(Err(error)) => {
            tracing::warn!(%error, "chunk store lookup failed; answering no");
            vec![false; count]
        }
        Err(error) => {
            tracing::warn!(%error, "chunk store lookup failed; answering no");
            vec![false; count]
        }
    }
}

/// Reads the bulk stream, splits it into frames and decodes them on a blocking thread into the
/// staging file. Returns the staged file, its BLAKE3 and its length.
async fn decode_stream(
    session: Arc<Session>,
    transfer: Arc<Transfer>,
    chunks: Arc<ChunkStore>,
    staged: StagedFile,
    announced_size: u64,
    host_name: String,
) -> Result<Decoded, TransferFailure> {
    let (frames, mut frames_in) = mpsc::channel::<bytes::Bytes>(4);
    let decoder_transfer = transfer.clone();
    let decoder = tokio::task::spawn_blocking(move || {
        let mut staged = staged;
        let result = decode_frames(
            &mut frames_in,
            &chunks,
            &mut staged,
            &decoder_transfer,
            announced_size,
        );
        result.map(|(hash, length)| (staged, hash, length))
    });
    let read = async {
        let mut splitter = FrameSplitter::default();
        loop {
            match session.recv().await {
                Ok(Some(data)) => {
                    transfer
                        .wire_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    splitter.push(&data);
                    while let Some(frame) = splitter.next_frame()? {
                        if frames.send(frame).await.is_err() {
                            // The decoder stopped; its error says why.
                            return Ok(());
                        }
                    }
                }
                Ok(None) if splitter.leftover() == 0 => return Ok(()),
                Ok(None) => {
                    return Err(TransferFailure::new(
                        ErrorCode::Internal,
                        "the bulk stream ended inside a frame",
                    ));
                }
                Err(error) => return Err(TransferFailure::session(&error)),
            }
        }
    };
    let read_result = read.await;
    drop(frames);
    let decoded = decoder.await.map_err(|error| {
        TransferFailure::new(
            ErrorCode::Internal,
            format!("decoder thread failed: {error}"),
        )
    })?;
    match (read_result, decoded) {
        (_, Err(DecodeFailure::Disk(error))) => Err(TransferFailure::new(
            ErrorCode::InsufficientResources,
            format!("not enough disk space on host {host_name} to receive the image: {error}"),
        )),
        (_, Err(DecodeFailure::Other(failure))) => Err(failure),
        (Err(failure), _) => Err(failure),
        (Ok(()), Ok(done)) => Ok(done),
    }
}

enum DecodeFailure {
    Disk(String),
    Other(TransferFailure),
}

fn decode_frames(
    frames: &mut mpsc::Receiver<bytes::Bytes>,
    chunks: &ChunkStore,
    staged: &mut StagedFile,
    transfer: &Transfer,
    announced_size: u64,
) -> Result<(blake3::Hash, u64), DecodeFailure> {
    let classify = |context: &str, error: &(dyn std::error::Error + 'static)| {
        if is_disk_full(error) {
            DecodeFailure::Disk(describe(error))
        } else {
            DecodeFailure::Other(TransferFailure::new(
                ErrorCode::Internal,
                format!("{context}: {}", describe(error)),
            ))
        }
    };
    let file = std::fs::File::create(&staged.path)
        .map_err(|error| classify("creating the staging file", &error))?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = blake3::Hasher::new();
    let mut length = 0u64;
    let mut decoder =
        ChunkDecoder::new(ChunkDecoderConfig::default(), StoreRepository::new(chunks))
            .map_err(|error| classify("starting the decoder", &error))?;
    while let Some(frame) = frames.blocking_recv() {
        decoder
            .decode_frame(&frame, |bytes| {
                length += bytes.len() as u64;
                if length > announced_size {
                    return Err(std::io::Error::other(format!(
                        "the image is longer than the {announced_size} bytes announced"
                    )));
                }
                hasher.update(bytes);
                writer.write_all(bytes)
            })
            .map_err(|error| classify("decoding a frame", &error))?;
        transfer.raw_bytes_done.store(length, Ordering::Relaxed);
    }
    let file = writer
        .into_inner()
        .map_err(|error| classify("writing the staging file", error.error()))?;
    file.sync_all()
        .map_err(|error| classify("syncing the staging file", &error))?;
    Ok((hasher.finalize(), length))
}

async fn verify_and_store(
    service: &Arc<TransferService>,
    offer: &ImageOffer,
    staged: &mut StagedFile,
    hash: blake3::Hash,
    length: u64,
) -> Result<novacron_types::ImageRecord, TransferFailure> {
    if length != offer.size {
        return Err(TransferFailure::new(
            ErrorCode::Internal,
            format!(
                "the image arrived incomplete: {length} of {} bytes; nothing was stored",
                offer.size
            ),
        ));
    }
    let id = hash.to_hex().to_string();
    if id != offer.id {
        return Err(TransferFailure::new(
            ErrorCode::Internal,
            format!(
                "the image arrived damaged: its BLAKE3 is {id}, the sender announced {}; \
                 nothing was stored",
                offer.id
            ),
        ));
    }
    service
        .store_received(offer, staged, length)
        .await
        .map_err(TransferFailure::from)
}
