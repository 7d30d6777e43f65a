//! The forwarder: one thread per direction reads packets from one TUN/TAP device, asks the
//! [`DirectionModel`] what happens to each, holds delivered packets in a release-time heap and
//! writes them to the other device when due. It never blocks on one device while a packet is
//! due on the other: each thread waits with `ppoll` until the earlier of "input readable" and
//! "next release time".

use std::cmp::Ordering as CompareOrdering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::LinkError;
use crate::model::{DirectionModel, Verdict};
use crate::offload;
use crate::sys;

/// Longest wait before a thread re-checks its stop flag.
const IDLE_WAKE: Duration = Duration::from_millis(50);
/// Packets read in one go before due packets are released again.
const READ_BATCH: usize = 64;

/// Live counters of one direction, updated by its forwarder thread.
#[derive(Debug, Default)]
pub struct DirectionCounters {
    packets_received: AtomicU64,
    bytes_received: AtomicU64,
    packets_forwarded: AtomicU64,
    bytes_forwarded: AtomicU64,
    dropped_by_loss: AtomicU64,
    dropped_by_queue: AtomicU64,
    dropped_while_disconnected: AtomicU64,
    dropped_by_write_error: AtomicU64,
}

/// A snapshot of one direction's live counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirectionCountersSnapshot {
    /// Packets read from the sending side.
    pub packets_received: u64,
    /// Bytes read from the sending side.
    pub bytes_received: u64,
    /// Packets written to the receiving side.
    pub packets_forwarded: u64,
    /// Bytes written to the receiving side.
    pub bytes_forwarded: u64,
    /// Packets lost at random.
    pub dropped_by_loss: u64,
    /// Packets dropped because the bottleneck queue was full.
    pub dropped_by_queue: u64,
    /// Packets dropped while the direction was disconnected (partition).
    pub dropped_while_disconnected: u64,
    /// Packets the receiving device refused (for example because it is down).
    pub dropped_by_write_error: u64,
}

impl DirectionCounters {
    /// Reads every counter.
    pub fn snapshot(&self) -> DirectionCountersSnapshot {
        DirectionCountersSnapshot {
            packets_received: self.packets_received.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            packets_forwarded: self.packets_forwarded.load(Ordering::Relaxed),
            bytes_forwarded: self.bytes_forwarded.load(Ordering::Relaxed),
            dropped_by_loss: self.dropped_by_loss.load(Ordering::Relaxed),
            dropped_by_queue: self.dropped_by_queue.load(Ordering::Relaxed),
            dropped_while_disconnected: self.dropped_while_disconnected.load(Ordering::Relaxed),
            dropped_by_write_error: self.dropped_by_write_error.load(Ordering::Relaxed),
        }
    }
}

fn add(counter: &AtomicU64, amount: u64) {
    counter.fetch_add(amount, Ordering::Relaxed);
}

/// Shared state of one running direction: counters and the partition switch.
#[derive(Debug, Default)]
pub(crate) struct DirectionHandle {
    pub(crate) counters: DirectionCounters,
    pub(crate) disconnected: AtomicBool,
    /// A model to switch to (a reshaped link); packets already in flight keep their times.
    pub(crate) replacement: Mutex<Option<DirectionModel>>,
    pub(crate) replacement_pending: AtomicBool,
}

impl DirectionHandle {
    pub(crate) fn replace_model(&self, model: DirectionModel) {
        *self
            .replacement
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(model);
        self.replacement_pending.store(true, Ordering::Release);
    }
}

struct Pending {
    release_at_ns: u64,
    sequence: u64,
    buffer: Vec<u8>,
    length: usize,
    /// Wire packets and IP bytes this stands for (more than one for a TCP super-packet).
    wire_packets: u64,
    wire_bytes: u64,
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CompareOrdering::Equal
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<CompareOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    // Reversed, so the max-heap pops the earliest release (and the earliest arrival on ties).
    fn cmp(&self, other: &Self) -> CompareOrdering {
        (other.release_at_ns, other.sequence).cmp(&(self.release_at_ns, self.sequence))
    }
}

/// Everything a direction thread owns.
pub(crate) struct Direction {
    pub(crate) label: String,
    pub(crate) input: Arc<File>,
    pub(crate) output: Arc<File>,
    pub(crate) model: DirectionModel,
    pub(crate) handle: Arc<DirectionHandle>,
    pub(crate) buffer_size: usize,
    /// SCHED_FIFO priority for the thread, if wanted.
    pub(crate) realtime_priority: Option<i32>,
    /// Devices carry a virtio header and TCP super-packets (see [`crate::offload`]).
    pub(crate) segmentation_offload: bool,
    /// Timed wake-ups happen on multiples of this (0: exactly when a packet is due).
    pub(crate) release_granularity_ns: u64,
}

/// Starts the thread for one direction. It runs until `stop` is set.
pub(crate) fn spawn_direction(
    direction: Direction,
    clock_start: Instant,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, LinkError> {
    let thread_name = format!("linkemu {}", direction.label);
    std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || run_direction(direction, clock_start, &stop))
        .map_err(|source| LinkError::StartThread {
            thread: thread_name,
            source,
        })
}

fn elapsed_ns(clock_start: Instant) -> u64 {
    u64::try_from(clock_start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn run_direction(mut direction: Direction, clock_start: Instant, stop: &AtomicBool) {
    sys::set_thread_timer_slack(Duration::from_nanos(1));
    if let Some(priority) = direction.realtime_priority
        && let Err(error) = sys::set_thread_realtime(priority)
    {
        tracing::debug!(direction = %direction.label, %error, "no real-time priority, forwarding at normal priority");
    }
    let mut pending: BinaryHeap<Pending> = BinaryHeap::new();
    let mut spare_buffers: Vec<Vec<u8>> = Vec::new();
    let mut sequence = 0u64;
    let handle = Arc::clone(&direction.handle);
    let counters = &handle.counters;
    while !stop.load(Ordering::Relaxed) {
        if handle.replacement_pending.swap(false, Ordering::Acquire)
            && let Some(model) = handle
                .replacement
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        {
            direction.model = model;
        }
        let now = elapsed_ns(clock_start);
        release_due(&mut direction, &mut pending, &mut spare_buffers, now);
        // Timed wake-ups are rounded up to the release granularity: each one is costly (about
        // as much as forwarding a packet), and a packet may leave late by less than it.
        let wait = pending
            .peek()
            .map(|next| {
                let wake = match direction.release_granularity_ns {
                    0 => next.release_at_ns,
                    granularity => next.release_at_ns.div_ceil(granularity) * granularity,
                };
                Duration::from_nanos(wake.saturating_sub(now))
            })
            .unwrap_or(IDLE_WAKE)
            .min(IDLE_WAKE);
        match sys::wait_readable(&direction.input, wait) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(error) => {
                tracing::error!(direction = %direction.label, %error, "cannot wait on device, forwarder stops");
                return;
            }
        }
        for _ in 0..READ_BATCH {
            let mut buffer = spare_buffers
                .pop()
                .unwrap_or_else(|| vec![0; direction.buffer_size]);
            let length = match (&*direction.input).read(&mut buffer) {
                Ok(0) => {
                    spare_buffers.push(buffer);
                    break;
                }
                Ok(length) => length,
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    spare_buffers.push(buffer);
                    break;
                }
                Err(error) if error.kind() == ErrorKind::Interrupted => {
                    spare_buffers.push(buffer);
                    continue;
                }
                Err(error) => {
                    tracing::warn!(direction = %direction.label, %error, "read from device failed");
                    spare_buffers.push(buffer);
                    break;
                }
            };
            let now = elapsed_ns(clock_start);
            if direction.segmentation_offload {
                let frame = buffer[..length].to_vec();
                spare_buffers.push(buffer);
                admit_offloaded(&mut direction, &mut pending, &mut sequence, now, frame);
                release_due(&mut direction, &mut pending, &mut spare_buffers, now);
                continue;
            }
            add(&counters.packets_received, 1);
            add(&counters.bytes_received, length as u64);
            if handle.disconnected.load(Ordering::Relaxed) {
                add(&counters.dropped_while_disconnected, 1);
                spare_buffers.push(buffer);
                continue;
            }
            match direction.model.admit(now, length) {
                Verdict::Deliver { release_at_ns } => {
                    sequence += 1;
                    pending.push(Pending {
                        release_at_ns,
                        sequence,
                        buffer,
                        length,
                        wire_packets: 1,
                        wire_bytes: length as u64,
                    });
                }
                Verdict::DropLoss => {
                    add(&counters.dropped_by_loss, 1);
                    spare_buffers.push(buffer);
                }
                Verdict::DropQueue => {
                    add(&counters.dropped_by_queue, 1);
                    spare_buffers.push(buffer);
                }
            }
            release_due(&mut direction, &mut pending, &mut spare_buffers, now);
        }
    }
}

fn release_due(
    direction: &mut Direction,
    pending: &mut BinaryHeap<Pending>,
    spare_buffers: &mut Vec<Vec<u8>>,
    now: u64,
) {
    let counters = &direction.handle.counters;
    while pending.peek().is_some_and(|next| next.release_at_ns <= now) {
        let Some(packet) = pending.pop() else { break };
        match (&*direction.output).write(&packet.buffer[..packet.length]) {
            Ok(_) => {
                add(&counters.packets_forwarded, packet.wire_packets);
                add(&counters.bytes_forwarded, packet.wire_bytes);
            }
            Err(error) => {
                add(&counters.dropped_by_write_error, 1);
                tracing::trace!(direction = %direction.label, %error, "write to device failed");
            }
        }
        // Keep a bounded pool: enough for bursts, not the whole bandwidth-delay product.
        if spare_buffers.len() < 4096 && packet.buffer.len() == direction.buffer_size {
            spare_buffers.push(packet.buffer);
        }
    }
}

/// Runs every wire segment of an offloaded packet through the model, then queues the surviving
/// runs of consecutive segments, each released when its last segment is due.
fn admit_offloaded(
    direction: &mut Direction,
    pending: &mut BinaryHeap<Pending>,
    sequence: &mut u64,
    now: u64,
    frame: Vec<u8>,
) {
    let handle = Arc::clone(&direction.handle);
    let counters = &handle.counters;
    let disconnected = handle.disconnected.load(Ordering::Relaxed);
    let packet = offload::parse(&frame);
    let segments = packet.map_or(1, |packet| packet.segments());
    let wire_lengths: Vec<usize> = (0..segments)
        .map(|index| match &packet {
            Some(packet) => packet.segment_wire_bytes(index),
            None => frame.len().saturating_sub(offload::VIRTIO_HEADER_BYTES),
        })
        .collect();
    let wire_bytes_of = |index: usize| wire_lengths[index];
    let mut releases: Vec<Option<u64>> = Vec::with_capacity(segments);
    for index in 0..segments {
        let wire_bytes = wire_bytes_of(index);
        add(&counters.packets_received, 1);
        add(&counters.bytes_received, wire_bytes as u64);
        if disconnected {
            add(&counters.dropped_while_disconnected, 1);
            releases.push(None);
            continue;
        }
        releases.push(match direction.model.admit(now, wire_bytes) {
            Verdict::Deliver { release_at_ns } => Some(release_at_ns),
            Verdict::DropLoss => {
                add(&counters.dropped_by_loss, 1);
                None
            }
            Verdict::DropQueue => {
                add(&counters.dropped_by_queue, 1);
                None
            }
        });
    }
    let mut push = |buffer: Vec<u8>, release_at_ns: u64, first: usize, end: usize| {
        *sequence += 1;
        let length = buffer.len();
        pending.push(Pending {
            release_at_ns,
            sequence: *sequence,
            buffer,
            length,
            wire_packets: (end - first) as u64,
            wire_bytes: (first..end).map(|index| wire_bytes_of(index) as u64).sum(),
        });
    };
    if releases.iter().all(Option::is_some) {
        let release_at_ns = releases.iter().flatten().copied().max().unwrap_or(now);
        push(frame, release_at_ns, 0, segments);
        return;
    }
    let Some(packet) = packet else { return };
    let mut index = 0;
    while index < segments {
        if releases[index].is_none() {
            index += 1;
            continue;
        }
        let first = index;
        let mut release_at_ns = 0;
        while let Some(Some(release)) = releases.get(index) {
            release_at_ns = release_at_ns.max(*release);
            index += 1;
        }
        push(
            offload::build_run(&frame, &packet, first, index),
            release_at_ns,
            first,
            index,
        );
    }
}
