//! The migration stream proxy: QEMU's stream in on the source, re-encoded RAM pages over a DWCP
//! transport session, the identical stream out into the destination QEMU's `-incoming` socket.
//!
//! The core is sans-IO: [`ProxyEncoder`] turns stream bytes into proxy messages, and
//! [`ProxyDecoder`] turns messages back into stream bytes. [`send_migration_stream`] and
//! [`receive_migration_stream`] are the thin executors over a [`Session`]. This module does not
//! start QEMU, choose hosts or set migration parameters.
//!
//! Wire format (version [`PROXY_VERSION`]; a change here is a wire-format change), carried on the
//! session's ordered bulk stream as messages `u8 kind, be32 body length, body`:
//!
//! - `HELLO` (first, once): `NCMIG` (QEMU's migration stream), `NCNBD` (the client's half of
//!   an NBD connection, [`StreamFormat::Nbd`]) or `NCMFD` (one of QEMU's multifd channels,
//!   [`StreamFormat::Multifd`]), u8 version, be64 mirror page limit (both codec sides must agree
//!   on it).
//! - `BATCH`: be32 script length, be32 compressed script length, the zstd-compressed script, then
//!   one page frame of the codec (or nothing when the batch holds no page). The script replays
//!   the stream in order: `0x01 varint n, n bytes` (opaque bytes, including whole ZERO records),
//!   `0x02` (the next page of the frame, a record that names its block), `0x03` (the next page,
//!   a CONTINUE record), `0x04` (the next page's bytes alone: an NBD write's payload page, a
//!   multifd packet's page). The codec carries each PAGE payload as zero / known / delta /
//!   literal (see `novacron_codec::page`) and zstd-compresses the frame.
//! - `END` (last): be64 length and the stream digest of the original stream (BLAKE3 over the
//!   stream with each PAGE payload replaced by its BLAKE3: see [`crate::rebuild`]). The
//!   destination compares them with what it rebuilt and fails on any difference.
//!
//! Version 2 (no change in the bytes): a migration's memory session may refer by hash to blocks
//! its disk session delivered ([`crate::delivered`]), which both sides record alike.
//!
//! Version 3: `END` carries the stream digest instead of the BLAKE3 of the whole stream (the
//! same length, another value: a version-2 side would report a mismatch, so the hello refuses
//! it).
//!
//! ZERO records travel as opaque bytes (nine bytes each before compression), not through the
//! codec: the codec's mirror only changes between frames, and a ZERO record sits between pages.
//! Page contents the codec remembers are its own (last PAGE payload sent per key), the same on
//! both sides, so QEMU's ZERO and XBZRLE records changing the destination's RAM in between do
//! not make a delta or a "known" page wrong.

use std::time::Duration;

use bytes::Bytes;
use novacron_codec::{
    DecodeError, EncodeError, PAGE_SIZE as CODEC_PAGE_SIZE, Page, PageDecoder, PageDecoderConfig,
    PageEncoder, PageEncoderConfig, PageStats,
};
use novacron_transport::{Session, TransportError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::delivered::DeliveredPages;
use crate::image_pages::SharedImagePages;
use crate::multifd::MultifdParser;
use crate::nbd::NbdParser;
use crate::rebuild::{StreamDigest, StreamRebuilder};
use crate::stream::{EventParser, PAGE_SIZE, ParseError, RecordNaming, StreamEvent, StreamParser};

/// Version of the proxy's wire format.
pub const PROXY_VERSION: u8 = 3;
const HELLO_MAGIC: &[u8; 5] = b"NCMIG";
const HELLO_MAGIC_NBD: &[u8; 5] = b"NCNBD";
const HELLO_MAGIC_MULTIFD: &[u8; 5] = b"NCMFD";

const MESSAGE_HELLO: u8 = 0;
const MESSAGE_BATCH: u8 = 1;
const MESSAGE_END: u8 = 2;
const MESSAGE_HEADER_LENGTH: usize = 5;

const OP_OPAQUE: u8 = 0x01;
const OP_PAGE_NAMED: u8 = 0x02;
const OP_PAGE_CONTINUE: u8 = 0x03;
const OP_PAGE_BARE: u8 = 0x04;

/// Largest message body accepted (a frame of 4096 literal pages plus a full script fits).
pub const MAX_MESSAGE_LENGTH: usize = 32 << 20;
/// Largest decompressed script accepted.
pub const MAX_SCRIPT_LENGTH: usize = 8 << 20;
/// Opaque bytes gathered before a batch is sent without waiting for more pages.
const OPAQUE_FLUSH_LENGTH: usize = 1 << 20;
const SCRIPT_ZSTD_LEVEL: i32 = 3;

const _: () = assert!(PAGE_SIZE == CODEC_PAGE_SIZE);

/// Why the proxy failed. Either side failing leaves the destination QEMU with an incomplete
/// stream, which it refuses: the source VM keeps running.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("qemu's migration stream could not be parsed")]
    Parse(#[from] ParseError),
    #[error("encoding ram pages failed")]
    Encode(#[from] EncodeError),
    #[error("decoding ram pages failed")]
    Decode(#[from] DecodeError),
    #[error("the transport session failed")]
    Transport(#[from] TransportError),
    #[error("{action} failed")]
    Io {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed proxy message at message offset {offset}: {reason}")]
    Protocol { offset: u64, reason: String },
    #[error(
        "the rebuilt stream differs from the source's: {actual_length} bytes with blake3 {actual}, \
         the source sent {expected_length} bytes with blake3 {expected}"
    )]
    ChecksumMismatch {
        expected_length: u64,
        expected: String,
        actual_length: u64,
        actual: String,
    },
    #[error(
        "the source qemu asked for a return path, which this proxy does not carry: migrate \
         without the return-path and postcopy capabilities"
    )]
    ReturnPathRequested,
}

/// What the proxy carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StreamFormat {
    /// QEMU's migration stream ([`crate::stream`]).
    #[default]
    Migration,
    /// The client's half of an NBD connection ([`crate::nbd`]): a block mirror writing a disk;
    /// the server's replies come back raw on the duplex executors' return direction.
    Nbd,
    /// One of QEMU's multifd channels ([`crate::multifd`]), each carried by a session of its
    /// own, with a codec (and page mirror) of its own.
    Multifd,
}

impl StreamFormat {
    fn hello_magic(self) -> &'static [u8; 5] {
        match self {
            StreamFormat::Migration => HELLO_MAGIC,
            StreamFormat::Nbd => HELLO_MAGIC_NBD,
            StreamFormat::Multifd => HELLO_MAGIC_MULTIFD,
        }
    }
}

/// Settings both sides must agree on (the hello carries them).
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// What is carried (the hello says it; the destination refuses another).
    pub format: StreamFormat,
    /// Codec settings of the source side; `mirror_page_limit` is checked by the destination.
    pub encoder: PageEncoderConfig,
    /// How long the source waits for more of QEMU's stream before sending a partial batch.
    pub idle_flush: Duration,
    /// Size of reads from QEMU's socket.
    pub read_size: usize,
    /// Keep the session's bulk send window near four times the bandwidth-delay product the
    /// session measures (more while the window holds the link back), never below this (`None`:
    /// leave the window as configured). QEMU sees only how fast the proxy takes its stream, so
    /// what is queued beyond the link is what the guest's final pause waits for; too small a
    /// window caps the rate at window / RTT instead. The session's configured window is the
    /// ceiling.
    pub adaptive_send_window_minimum: Option<u64>,
    /// The path rate the adaptive window starts from, bytes per second (the link's forecast
    /// when there is one; else the transport's default guess of 1 Gbit/s). The first
    /// measurement, a second later, corrects it either way.
    pub initial_rate_bytes_per_second: f64,
    /// `initial_rate_bytes_per_second` is what this link was measured to carry (a forecast),
    /// not a guess: the window never holds less than four of its bandwidth-delay products of
    /// QEMU's stream (in message bytes, that divided by the stream's encoding ratio so far). A
    /// session's first seconds measure TCP's ramp-up, and on a lossy path a window cut to that
    /// pace stays there (the rate a window allows is window / RTT', RTT' about four round trips
    /// at 0.5 % loss, so four measured products are the same window again): a 2 GiB guest of
    /// random pages at 1 Gbit/s and 0.5 % loss took 10.6-11.6 s, 6.8 s with a 32 MiB window.
    /// It also caps the rate the session's connections send at together, a little above the
    /// forecast and rising while the link carries more
    /// (`novacron_transport::policy::pacing_limit_for`).
    pub initial_rate_is_measured: bool,
    /// With a measured initial rate, the rate the pacing limit and the window before the
    /// session's first measurement are set over when higher: what the link was seen to carry
    /// lately (its peak; a forecast averages short transfers' ramps and sits below the link).
    /// The window's floor stays at the initial rate's products: bytes queued at the
    /// switch-over are part of the guest's pause.
    pub pacing_basis_bytes_per_second: Option<f64>,
    /// The most a full send window may take to cross the link at the rate measured, when the
    /// adaptive window grows past four bandwidth-delay products because it held the link back
    /// (a lossy path: see `SendWindow`). What a full window holds at the switch-over is part of
    /// the guest's pause.
    pub window_drain_budget: Duration,
    /// The 4 KiB blocks of the VM's base image, which both hosts hold: RAM pages equal to one
    /// travel as its hash (source) and are read back from the image (destination).
    pub image_pages: SharedImagePages,
    /// The caller carries QEMU's return path (the destination's answers on the same socket):
    /// [`send_migration_stream_duplex`] and [`receive_migration_stream_duplex`] do. Without it a
    /// stream that opens a return path is refused, since the source would wait for answers
    /// forever.
    pub carry_return_path: bool,
    /// The stream resumes a paused post-copy ([`StreamParser::resumed_postcopy`]): it has no
    /// header and is carried opaque (compressed). Only the source's parser looks at it.
    pub resumed_postcopy: bool,
    /// Lets the caller empty the session's queue before QEMU sends something urgent behind it
    /// (the device state at a switch to post-copy); see [`SendWindowControl`].
    pub window_control: SendWindowControl,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            format: StreamFormat::Migration,
            encoder: PageEncoderConfig {
                // Set from `image_pages`: the only content the destination is known to hold
                // (no round trip per frame over the control channel).
                query_destination: false,
                ..PageEncoderConfig::default()
            },
            idle_flush: Duration::from_millis(20),
            read_size: 256 << 10,
            adaptive_send_window_minimum: Some(2 << 20),
            initial_rate_bytes_per_second: 125e6,
            initial_rate_is_measured: false,
            pacing_basis_bytes_per_second: None,
            window_drain_budget: Duration::from_millis(500),
            image_pages: SharedImagePages::default(),
            carry_return_path: false,
            resumed_postcopy: false,
            window_control: SendWindowControl::default(),
        }
    }
}

/// What one side of the proxy moved.
#[derive(Clone, Debug, Default)]
pub struct ProxyReport {
    /// Bytes of QEMU's stream (read on the source, written on the destination).
    pub stream_bytes: u64,
    /// The stream digest of QEMU's stream (BLAKE3 over it with each page's payload replaced by
    /// the page's BLAKE3; see [`crate::rebuild`]).
    pub stream_checksum: [u8; 32],
    /// Proxy message bytes (sent or received), before the transport's framing and TLS.
    pub message_bytes: u64,
    pub batches: u64,
    pub pages: u64,
    /// Opaque bytes carried in scripts, before compression (framing, ZERO records, device state).
    pub opaque_bytes: u64,
    /// Compressed script bytes.
    pub script_bytes: u64,
    /// The codec's counters for PAGE payloads.
    pub codec: PageStats,
    /// Of `codec.known_from_destination`, pages found in the held files (a direct kernel boot's
    /// kernel and initrd: [`crate::HeldFile`]) rather than in the base image or the disk
    /// mirror's blocks. Source side only.
    pub pages_from_files: u64,
    /// Where the codec thread's time went: which stage of the pipeline held the stream back.
    pub timing: CodecTiming,
}

/// Where one side's codec thread spent the stream: working, waiting for its input (at the
/// source: QEMU's stream; at the destination: the session), or waiting for its output to be
/// taken (at the source: the session, its send window and the link; at the destination: the
/// destination QEMU loading the stream). The stage that keeps the codec waiting is the one that
/// sets the pace.
#[derive(Clone, Copy, Debug, Default)]
pub struct CodecTiming {
    pub working: Duration,
    pub waiting_for_input: Duration,
    pub waiting_for_output: Duration,
}

impl CodecTiming {
    /// Runs `wait` (a blocking receive or send) and counts its time as waiting.
    fn wait<T>(waited: &mut Duration, wait: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let result = wait();
        *waited += started.elapsed();
        result
    }

    /// With the time since `started` not spent waiting counted as working.
    fn finished(self, started: std::time::Instant) -> Self {
        Self {
            working: started
                .elapsed()
                .saturating_sub(self.waiting_for_input + self.waiting_for_output),
            ..self
        }
    }
}

impl std::fmt::Display for CodecTiming {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "codec working {:.2} s, waiting for input {:.2} s, for output {:.2} s",
            self.working.as_secs_f64(),
            self.waiting_for_input.as_secs_f64(),
            self.waiting_for_output.as_secs_f64()
        )
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_message(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}

/// The send window the adaptive proxy settles on for a link of `rate` bytes/s and `round_trip`:
/// what is still in flight when QEMU stops the guest (the convergence plan takes its crossing
/// time out of QEMU's downtime limit).
pub fn expected_send_window(config: &ProxyConfig, rate: f64, round_trip: Duration) -> u64 {
    let product = (SendWindow::FACTOR * rate.max(0.0) * round_trip.as_secs_f64()) as u64;
    product.max(config.adaptive_send_window_minimum.unwrap_or(0))
}

/// Bulk connections a migration's session opens with itself (see
/// [`migration_session_options`]).
pub const MIGRATION_PARALLEL_START: u32 = 2;

/// Session options for a migration (its memory stream, and the disk's NBD session beside it)
/// from `base`: the session opens [`MIGRATION_PARALLEL_START`] bulk connections with itself,
/// and never probes with more. A migration lasts seconds, and a cold connection's ramp-up was a
/// large part of them: at 1 Gbit/s, 50 ms RTT and 0.5 % loss a 2 GiB adversarial guest took
/// 6.4-7.0 s (mean 6.6, eight runs) with two connections from the start, 6.8-7.4 s (mean 7.1)
/// with one and probing, the default of other transfers (the probe's added connection cut the
/// rate for a quarter second in every run), 6.9-7.1 s with one alone; four did no better than
/// two; at 100 Mbit/s it made no difference, and a realistic guest at 1 Gbit/s (40 MB on the
/// link, CPU-bound) was within its runs' spread, its pause perhaps 70 ms longer (a loss near the
/// end delays the stream if it hits either connection; bench/migration/README.md, "Two
/// connections from the start"). The first count still follows the forecast's bandwidth-delay
/// product (`base.bandwidth_hint_bytes_per_second`) over one connection's window when that asks
/// for more; the transport's start-up share (`startup_share_bytes`) is off: two were measured.
pub fn migration_session_options(
    base: novacron_transport::SessionOptions,
) -> novacron_transport::SessionOptions {
    novacron_transport::SessionOptions {
        parallel_start_connections: MIGRATION_PARALLEL_START,
        startup_share_bytes: 0,
        adapt_stream_count: false,
        ..base
    }
}

/// What a migration session holds that has not reached the destination's application: its
/// send window, or more right after the window was cut below what was queued. The guest's pause
/// waits for all of it to cross, so the convergence plan counts it as in flight.
pub fn queued_wire_bytes(session: &Session) -> u64 {
    session
        .bulk_send_window()
        .max(session.stats().send_buffered_bytes)
}

/// A handle on a running [`send_migration_stream`]'s queue: [`SendWindowControl::drain`] makes
/// the proxy stop reading QEMU's stream and hand the session nothing more while the session
/// holds more than a few frames (sent or not, until acknowledged), so what QEMU writes next
/// crosses the link right behind little else. Post-copy needs it: when QEMU switches, the guest
/// stops and its device state follows everything in QEMU's socket, the proxy's queues and the
/// send window (at 100 Mbit/s the pause was 0.34-0.61 s against QEMU's own 0.14-0.50 s; 0.04-0.10
/// s drained first: bench/migration/README.md). The session's window itself is left alone, so
/// what it holds goes out at the link's pace. Clones share the handle; a default one is idle.
#[derive(Clone, Debug, Default)]
pub struct SendWindowControl(std::sync::Arc<WindowControlState>);

#[derive(Debug, Default)]
struct WindowControlState {
    draining: std::sync::atomic::AtomicBool,
    /// Notified when `draining` changes: the stream's watcher waits for a drain to begin and
    /// its reader for the release, rather than polling.
    drain_changed: tokio::sync::Notify,
    /// A stream runs and publishes what follows.
    attached: std::sync::atomic::AtomicBool,
    /// What the session held at the last look (bytes).
    held: std::sync::atomic::AtomicU64,
    /// Looks taken so far: a drain waits for one taken after it began.
    looks: std::sync::atomic::AtomicU64,
    /// The reader stopped reading QEMU's stream after asking the encoder for its flush number
    /// `parked` (0: reading).
    parked: std::sync::atomic::AtomicU64,
    /// Flushes the encoder has done, batches it emitted, batches the sender handed to the
    /// session: with the reader parked, everything read is in the session once the parking
    /// flush is done and every emitted batch was sent.
    flushed: std::sync::atomic::AtomicU64,
    emitted: std::sync::atomic::AtomicU64,
    sent: std::sync::atomic::AtomicU64,
}

impl SendWindowControl {
    /// How often a running stream publishes what its session holds.
    const LOOK_INTERVAL: Duration = Duration::from_millis(10);
    /// The most a drained session holds: a few frames (a millisecond of 1 Gbit/s, 20 ms of
    /// 100 Mbit/s ahead of what comes next).
    const DRAINED: u64 = 256 << 10;

    /// Holds the proxy back until [`Self::release`] and waits, at most `deadline`, until the
    /// session holds no more than a few frames. False when it did not get there in time or no
    /// stream runs. Release it as soon as QEMU was told to switch: QEMU writes its device state
    /// once its blocked write completes, and only what its socket holds is ahead of it.
    pub async fn drain(&self, deadline: Duration) -> bool {
        use std::sync::atomic::Ordering;
        let state = &self.0;
        state.draining.store(true, Ordering::SeqCst);
        state.drain_changed.notify_waiters();
        let from = state.looks.load(Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        loop {
            let held = state.held.load(Ordering::SeqCst);
            let parked = state.parked.load(Ordering::SeqCst);
            let drained = parked > 0
                && state.flushed.load(Ordering::SeqCst) >= parked
                && state.sent.load(Ordering::SeqCst) >= state.emitted.load(Ordering::SeqCst)
                && state.looks.load(Ordering::SeqCst) > from
                && held <= Self::DRAINED;
            if drained || !state.attached.load(Ordering::SeqCst) || started.elapsed() >= deadline {
                tracing::debug!(
                    drained,
                    held,
                    waited_ms = started.elapsed().as_millis() as u64,
                    "migration session drained"
                );
                return drained;
            }
            tokio::time::sleep(Self::LOOK_INTERVAL).await;
        }
    }

    /// Lets the proxy fill the session's window again.
    pub fn release(&self) {
        tracing::debug!("migration session released after a drain");
        self.0
            .draining
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.0.drain_changed.notify_waiters();
    }

    fn draining(&self) -> bool {
        self.0.draining.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Returns once [`Self::draining`] is `draining`.
    async fn wait_until_draining_is(&self, draining: bool) {
        loop {
            let changed = std::pin::pin!(self.0.drain_changed.notified());
            let mut changed = changed;
            // Registered before the check: a change between the two is not missed.
            changed.as_mut().enable();
            if self.draining() == draining {
                return;
            }
            changed.await;
        }
    }

    /// The reader stopped after asking for flush number `flush` (0: it reads again).
    fn park(&self, flush: u64) {
        self.0
            .parked
            .store(flush, std::sync::atomic::Ordering::SeqCst);
    }

    fn count(counter: &std::sync::atomic::AtomicU64) {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Publishes what `session` holds every [`Self::LOOK_INTERVAL`] while a drain runs (the
    /// session's statistics are not read otherwise, and the watcher sleeps until a drain
    /// begins); never returns, dropped with the stream.
    async fn watch(&self, session: &Session) -> std::convert::Infallible {
        use std::sync::atomic::Ordering;
        let _attached = AttachedControl(self.clone());
        self.0.attached.store(true, Ordering::SeqCst);
        loop {
            self.wait_until_draining_is(true).await;
            while self.draining() {
                self.0
                    .held
                    .store(session.stats().send_buffered_bytes, Ordering::SeqCst);
                self.0.looks.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Self::LOOK_INTERVAL).await;
            }
        }
    }

    /// Waits, while draining, until `session` has room for `length` more bytes within
    /// [`Self::DRAINED`] (an empty session always takes one message).
    async fn admit(&self, session: &Session, length: usize) {
        let room = Self::DRAINED.saturating_sub(length as u64);
        while self.draining() {
            tokio::select! {
                // A failed session: the send that follows says why.
                _ = session.bulk_buffered_at_most(room) => return,
                () = self.wait_until_draining_is(false) => {}
            }
        }
    }
}

/// Marks a [`SendWindowControl`] detached when its stream ends.
struct AttachedControl(SendWindowControl);

impl Drop for AttachedControl {
    fn drop(&mut self) {
        self.0
            .0
            .attached
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The send window of a migration session, resized from what the session measures.
///
/// Without a forecast (`ProxyConfig::initial_rate_is_measured` false; `vm migrate` probes a
/// link it has not measured lately, so this is a failed probe or a bench), the rate is a guess
/// of 1 Gbit/s, and four of its products at 50 ms are 25 MB: two seconds of a 100 Mbit/s link
/// that a guest converging within the first second waited for in its pause (1.0-1.2 s where
/// QEMU's precopy paused 0.77 s, with the guest's kernel and initramfs held at the
/// destination). So until the link is measured the window starts from its minimum and
/// doubles at each step with a hold or a starved connection (one free to send found the next
/// frame held back by the window, or the window full and nothing left to send: TCP ramping up
/// faster than the window), up to the guess's four products and to twice four products of the
/// rate acknowledged over the last half second; after [`WindowStep::PATIENCE`] steps without
/// one it shrinks a tenth a step toward four products of that rate. (The plan's first estimate
/// of what is in flight, [`expected_send_window`], still counts the guess's four products: an
/// overestimate, on the safe side.)
///
/// With a forecast, until the transport has measured the link (a second in), the window is four
/// bandwidth-delay products of the forecast link rate, in message bytes: what
/// crosses in four round trips, whatever it stands for. It used to be divided by the stream's
/// encoding ratio so far, but a stream starts with its most compressible part (zero pages,
/// pages the destination holds), so a 2 GiB adversarial guest at (b) started from 3 MB and
/// grew a quarter per step for a second and a half while TCP could have ramped up: 7.0-7.2 s
/// against 6.6-6.9 s without the division (bench/migration/README.md). A session's first
/// second is TCP's ramp-up, not the link: cutting the window to what the ramp-up carried held
/// a lossy 1 Gbit/s path at a fifth of its rate for two seconds.
///
/// Then the base is four measured bandwidth-delay products (with the connect-time RTT), never
/// below the minimum nor the forecast's floor. Two would do on a clean path, and every byte
/// beyond is queued pause, but at (b) of the bench the window then followed TCP's ramp-up
/// late: 6.5-6.7 s against 6.0-6.2 s over four runs each, for 30-40 ms less pause at
/// 100 Mbit/s. The base is not enough on a lossy path: a window allows window / RTT', and RTT'
/// (until the destination's application has the bytes, lost segments resent in between) is
/// about four round trips at 0.5 % loss, so four products of a window-limited rate are the
/// same window again (bench/migration/README.md, "The send window at 0.5 % loss"). So the
/// window also follows the transport's count of times a connection free to send found the next
/// frame held back by the window: a step (125 ms) with such holds grows the window by a
/// quarter; from the third step in a row without, it shrinks by a tenth a step toward the base
/// (the path, or QEMU, is the limit then). On a link the window does not limit (100 Mbit/s
/// without loss), connections wait on the path, never on the window, and the window stays at
/// its base.
///
/// Above its base, the window never holds more of QEMU's stream than the link carries within
/// `ProxyConfig::window_drain_budget` at the rate measured over the last half second, or the
/// transport's measured rate when that is higher: what a full window holds at the switch-over
/// is what the guest's final pause waits for, and the destination rebuilds and loads all of
/// the stream it stands for (a window of page hashes stands for many times its size). The
/// half second's rate alone dips while a connection recovers a lost segment (every few
/// milliseconds at 0.5 % loss and 1 Gbit/s), and a cap from the dip cut the window just as the
/// stall ended.
struct SendWindow {
    minimum: u64,
    /// Four bandwidth-delay products of the rate the window starts from: the window, in message
    /// bytes, until the link is measured.
    initial: u64,
    /// Four bandwidth-delay products of the link's forecast (0 without one), in QEMU's stream
    /// bytes: the window never holds less than this much of QEMU's stream.
    floor: u64,
    budget: f64,
    /// The transport's count of window holds at the last step.
    holds: u64,
    /// The initial rate is a guess, not a forecast: ramp up from the minimum (see the type).
    guessed: bool,
    /// The transport's count of connections that found the window full and nothing queued.
    starved: u64,
    /// Steps in a row without a hold.
    unheld_steps: u32,
    /// (when, bulk bytes acknowledged) at each step of the last second.
    samples: std::collections::VecDeque<(std::time::Instant, u64)>,
    last: std::time::Instant,
    /// The session's pacing is limited (there is a forecast): the window raises the limit as
    /// the transport does, on the last half second's rate every step.
    paced: bool,
}

/// The window a step sets, from what the step saw (pure, for the model-link tests).
#[derive(Clone, Copy, Debug)]
struct WindowStep {
    current: u64,
    /// Four measured bandwidth-delay products, the minimum and the floor applied (message bytes).
    base: u64,
    /// The most the window may hold above its base: the drain budget at the recent rate
    /// (message bytes).
    most: u64,
    /// Steps in a row, this one included, in which no connection found the next frame held
    /// back by the window (0: this step had a hold).
    unheld_steps: u32,
}

impl WindowStep {
    const GROWTH: f64 = 1.25;
    const DECAY: f64 = 0.9;
    /// Steps without a hold before the window shrinks: holds are events, and a connection
    /// resending a lost segment does not ask for frames for a while (a window at the edge
    /// shrank during such a stall and then held the link back).
    const PATIENCE: u32 = 2;

    fn next(self) -> u64 {
        let window = if self.unheld_steps == 0 {
            (self.current as f64 * Self::GROWTH) as u64
        } else if self.unheld_steps > Self::PATIENCE {
            (self.current as f64 * Self::DECAY) as u64
        } else {
            self.current
        };
        window.min(self.most).max(self.base)
    }
}

/// The window a step sets before the link is measured when its rate is only a guess (pure).
#[derive(Clone, Copy, Debug)]
struct ColdStep {
    current: u64,
    minimum: u64,
    /// Four products of the guessed rate: the most the window ramps up to.
    most: u64,
    /// Four products of the rate acknowledged over the last half second, once there is one.
    recent_base: Option<u64>,
    unheld_steps: u32,
}

impl ColdStep {
    fn next(self) -> u64 {
        let window = if self.unheld_steps == 0 {
            // Doubling, but to no more than twice four products of what was acknowledged
            // lately: TCP on a slow link overshoots its bandwidth-delay product while it
            // ramps up, and finds a full window then without the window limiting it.
            let cap = self
                .recent_base
                .map_or(self.most, |base| base.saturating_mul(2).min(self.most));
            self.current.saturating_mul(2).min(cap).max(self.current)
        } else if self.unheld_steps > WindowStep::PATIENCE
            && let Some(base) = self.recent_base
        {
            ((self.current as f64 * WindowStep::DECAY) as u64)
                .max(base)
                .min(self.current)
        } else {
            self.current
        };
        window.max(self.minimum)
    }
}

impl SendWindow {
    const INTERVAL: Duration = Duration::from_millis(125);
    /// Round trips of data kept in flight or queued.
    const FACTOR: f64 = 4.0;
    /// What the recent rate (the drain budget's) is measured over.
    const RECENT: Duration = Duration::from_millis(500);

    fn new(session: &Session, minimum: u64, config: &ProxyConfig) -> Self {
        let round_trip = session
            .stats()
            .round_trip_estimate
            .unwrap_or(Duration::from_millis(10));
        let products = |rate: f64| (Self::FACTOR * rate * round_trip.as_secs_f64()) as u64;
        let guessed = !config.initial_rate_is_measured;
        // Until the session measures the link, the window holds four products of the higher
        // of the forecast and the link's recent peak (a forecast fed by short transfers' TCP
        // start-ups sits far below the link: four products of it held a 1 Gbit/s link to
        // 400-600 Mbit/s for the copy's first second); the floor for the rest of the copy,
        // which the plan counts as in flight at the pause, stays the forecast's.
        let initial = products(
            config
                .initial_rate_bytes_per_second
                .max(config.pacing_basis_bytes_per_second.unwrap_or(0.0)),
        );
        let floor = if guessed {
            0
        } else {
            products(config.initial_rate_bytes_per_second)
        };
        session.set_bulk_send_window(if guessed {
            minimum
        } else {
            minimum.max(initial)
        });
        if !guessed {
            let basis = config
                .pacing_basis_bytes_per_second
                .unwrap_or(0.0)
                .max(config.initial_rate_bytes_per_second);
            session
                .set_bulk_pacing_limit(Some(novacron_transport::policy::pacing_limit_for(basis)));
        }
        Self {
            minimum,
            initial,
            floor,
            budget: config.window_drain_budget.as_secs_f64(),
            holds: session.stats().bulk_send_window_holds,
            guessed,
            starved: session.stats().bulk_send_window_starved,
            unheld_steps: 0,
            samples: std::collections::VecDeque::new(),
            last: std::time::Instant::now(),
            paced: !guessed,
        }
    }

    /// Notes the bytes acknowledged so far, keeping the last second.
    fn record(&mut self, now: std::time::Instant, acknowledged: u64) {
        self.samples.push_back((now, acknowledged));
        while self
            .samples
            .front()
            .is_some_and(|sample| now.duration_since(sample.0) > Self::RECENT * 2)
        {
            self.samples.pop_front();
        }
    }

    /// The rate acknowledged between `from` and the last sample, bytes per second.
    fn rate_since(&self, from: std::time::Instant) -> Option<f64> {
        let last = self.samples.back()?;
        let first = self.samples.iter().find(|sample| sample.0 >= from)?;
        let span = last.0.duration_since(first.0).as_secs_f64();
        (span >= Self::INTERVAL.as_secs_f64() * 1.5)
            .then(|| last.1.saturating_sub(first.1) as f64 / span)
    }

    /// Resizes the window (see the type). `ratio` is the stream bytes read per message byte
    /// sent so far (1.0 until enough was sent to tell).
    fn adapt(&mut self, session: &Session, ratio: f64) {
        if self.last.elapsed() < Self::INTERVAL {
            return;
        }
        let now = std::time::Instant::now();
        self.last = now;
        let ratio = ratio.max(1.0);
        let stats = session.stats();
        let current = session.bulk_send_window();
        self.record(now, stats.bulk_bytes_acknowledged);
        // The transport raises the limit too (every 250 ms since the twenty-ninth session; this
        // raise on the last half second may now be redundant: one trial without it was within
        // the runs' spread, not enough to drop it).
        if self.paced
            && let Some(current) = stats.bulk_pacing_limit_bytes_per_second
            && let Some(raised) = self
                .rate_since(now - Self::RECENT)
                .and_then(|rate| novacron_transport::policy::raised_pacing_limit(current, rate))
        {
            tracing::debug!(limit = raised, "migration pacing limit raised");
            session.set_bulk_pacing_limit(Some(raised));
        }
        let starved = stats.bulk_send_window_starved > self.starved;
        self.starved = stats.bulk_send_window_starved;
        // Ramping up without a forecast, a full window with nothing left to send is the
        // window holding TCP back too.
        let held = stats.bulk_send_window_holds > self.holds
            || (self.guessed && stats.measured_rate_bytes_per_second <= 0.0 && starved);
        self.unheld_steps = if held { 0 } else { self.unheld_steps + 1 };
        self.holds = stats.bulk_send_window_holds;
        let floor = (self.floor as f64 / ratio) as u64;
        let wanted = match stats.round_trip_estimate {
            Some(round_trip) if stats.measured_rate_bytes_per_second > 0.0 => {
                let product = stats.measured_rate_bytes_per_second * round_trip.as_secs_f64();
                let recent = self
                    .rate_since(now - Self::RECENT)
                    .unwrap_or(0.0)
                    .max(stats.measured_rate_bytes_per_second);
                WindowStep {
                    current,
                    base: ((Self::FACTOR * product) as u64)
                        .max(self.minimum)
                        .max(floor),
                    most: (self.budget * recent / ratio) as u64,
                    unheld_steps: self.unheld_steps,
                }
                .next()
            }
            // Nothing measured yet: a guess ramps up, a forecast holds.
            _ if self.guessed => ColdStep {
                current,
                minimum: self.minimum,
                most: self.initial.max(self.minimum),
                recent_base: stats.round_trip_estimate.and_then(|round_trip| {
                    self.rate_since(now - Self::RECENT)
                        .map(|rate| (Self::FACTOR * rate * round_trip.as_secs_f64()) as u64)
                }),
                unheld_steps: self.unheld_steps,
            }
            .next(),
            _ => self.initial.max(self.minimum),
        };
        // Ignore small changes; a window that moves by a tenth per step still moves.
        if wanted.abs_diff(current) * 16 > current {
            let set = session.set_bulk_send_window(wanted);
            tracing::debug!(
                window = set,
                rate = stats.measured_rate_bytes_per_second,
                buffered = stats.send_buffered_bytes,
                unsent = stats.bulk_unsent_bytes,
                window_holds = stats.bulk_send_window_holds,
                credit_holds = stats.bulk_credit_holds,
                held,
                ratio,
                "migration send window"
            );
        }
    }
}

/// What the codec may take the destination to hold. A disk session delivers blocks rather than
/// refers to them: it sees the base image alone (its own earlier blocks are the codec's
/// "known from this transfer").
fn codec_view(config: &ProxyConfig) -> SharedImagePages {
    match config.format {
        StreamFormat::Migration | StreamFormat::Multifd => config.image_pages.clone(),
        StreamFormat::Nbd => SharedImagePages::new(config.image_pages.index.clone()),
    }
}

/// The record of delivered blocks a disk session keeps, with what the destination held before.
fn delivering(config: &ProxyConfig) -> Option<(SharedImagePages, std::sync::Arc<DeliveredPages>)> {
    let delivered = config.image_pages.delivered.clone()?;
    (config.format == StreamFormat::Nbd).then(|| {
        (
            SharedImagePages::new(config.image_pages.index.clone()),
            delivered,
        )
    })
}

/// Records a block the disk session carries, unless the destination held it already (zero, or a
/// block of the base image): the same rule on both sides.
fn record_delivered(
    held: &SharedImagePages,
    delivered: &DeliveredPages,
    hash: novacron_codec::ContentHash,
    block: &[u8],
) {
    if hash != novacron_codec::ContentHash::of_zero_page() && !held.in_image(&hash) {
        delivered.record(hash, block);
    }
}

/// Source side, sans-IO: QEMU's stream bytes in, proxy messages out.
pub struct ProxyEncoder {
    parser: Box<dyn EventParser>,
    format: StreamFormat,
    encoder: PageEncoder<SharedImagePages>,
    /// The disk session's record of the blocks it carries (NBD format only).
    delivering: Option<(SharedImagePages, std::sync::Arc<DeliveredPages>)>,
    /// The stream digest of what was read (see [`crate::rebuild`]).
    digest: StreamDigest,
    script: Vec<u8>,
    opaque_run: Vec<u8>,
    report: ProxyReport,
    mirror_page_limit: u64,
    carry_return_path: bool,
    hello_sent: bool,
    ended: bool,
}

impl ProxyEncoder {
    pub fn new(config: &ProxyConfig) -> Result<Self, ProxyError> {
        let view = codec_view(config);
        Ok(Self {
            parser: match config.format {
                StreamFormat::Migration if config.resumed_postcopy => {
                    Box::new(StreamParser::resumed_postcopy())
                }
                StreamFormat::Migration => Box::new(StreamParser::new()),
                StreamFormat::Nbd => Box::new(NbdParser::new()),
                StreamFormat::Multifd => Box::new(MultifdParser::new()),
            },
            format: config.format,
            encoder: PageEncoder::new(
                PageEncoderConfig {
                    query_destination: view.holds_anything(),
                    ..config.encoder.clone()
                },
                view,
            )?,
            delivering: delivering(config),
            digest: StreamDigest::new(),
            script: Vec::new(),
            opaque_run: Vec::new(),
            report: ProxyReport::default(),
            mirror_page_limit: config.encoder.mirror_page_limit as u64,
            carry_return_path: config.carry_return_path,
            hello_sent: false,
            ended: false,
        })
    }

    pub fn report(&self) -> ProxyReport {
        ProxyReport {
            codec: self.encoder.stats().clone(),
            pages_from_files: self.encoder.query().pages_from_files(),
            ..self.report.clone()
        }
    }

    fn hello(&mut self, out: &mut Vec<u8>) {
        if self.hello_sent {
            return;
        }
        let mut body = self.format.hello_magic().to_vec();
        body.push(PROXY_VERSION);
        body.extend_from_slice(&self.mirror_page_limit.to_be_bytes());
        let start = out.len();
        put_message(out, MESSAGE_HELLO, &body);
        self.report.message_bytes += (out.len() - start) as u64;
        self.hello_sent = true;
    }

    /// Post-copy device-state packages read so far: QEMU switched to post-copy there.
    pub fn postcopy_packages(&self) -> u64 {
        self.parser.postcopy_packages()
    }

    /// Takes the next bytes of QEMU's stream; appends complete messages to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), ProxyError> {
        self.hello(out);
        self.report.stream_bytes += bytes.len() as u64;
        self.parser.feed(bytes);
        self.drain(out)
    }

    fn drain(&mut self, out: &mut Vec<u8>) -> Result<(), ProxyError> {
        while let Some(event) = self.parser.next_event()? {
            if self.parser.return_path_requested() && !self.carry_return_path {
                return Err(ProxyError::ReturnPathRequested);
            }
            match event {
                StreamEvent::Page(page) => {
                    self.close_opaque_run();
                    self.script.push(match page.naming {
                        RecordNaming::Named => OP_PAGE_NAMED,
                        RecordNaming::Continue => OP_PAGE_CONTINUE,
                        RecordNaming::Bare => OP_PAGE_BARE,
                    });
                    self.report.pages += 1;
                    let page_bytes: &Page = &page.data;
                    let full = self
                        .encoder
                        .push_page(&page.block, page.offset, page_bytes)?;
                    let hash = self.encoder.last_hash();
                    self.digest
                        .page(&page.block, page.offset, page.naming, hash.as_bytes());
                    if let Some((held, delivered)) = &self.delivering {
                        record_delivered(held, delivered, hash, page_bytes);
                    }
                    if full {
                        self.flush(out)?;
                    }
                }
                other => {
                    let start = self.opaque_run.len();
                    crate::rebuild::write_event(&other, &mut self.opaque_run);
                    self.digest.bytes(&self.opaque_run[start..]);
                    self.report.opaque_bytes += (self.opaque_run.len() - start) as u64;
                    if self.opaque_run.len() >= OPAQUE_FLUSH_LENGTH {
                        self.flush(out)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn close_opaque_run(&mut self) {
        if self.opaque_run.is_empty() {
            return;
        }
        self.script.push(OP_OPAQUE);
        put_varint(&mut self.script, self.opaque_run.len() as u64);
        self.script.extend_from_slice(&self.opaque_run);
        self.opaque_run.clear();
    }

    /// Sends what is pending as one batch (nothing when nothing is pending).
    pub fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), ProxyError> {
        self.hello(out);
        self.close_opaque_run();
        if self.script.is_empty() {
            return Ok(());
        }
        let compressed =
            zstd::bulk::compress(&self.script, SCRIPT_ZSTD_LEVEL).map_err(|source| {
                ProxyError::Io {
                    action: "compressing the stream script",
                    source,
                }
            })?;
        // Written in place: the frame's pages are copied once, into `out`.
        let start = out.len();
        out.push(MESSAGE_BATCH);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(self.script.len() as u32).to_be_bytes());
        out.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
        out.extend_from_slice(&compressed);
        if let Err(error) = self.encoder.finish_frame(out) {
            out.truncate(start);
            return Err(error.into());
        }
        let body_length = (out.len() - start - MESSAGE_HEADER_LENGTH) as u32;
        out[start + 1..start + MESSAGE_HEADER_LENGTH].copy_from_slice(&body_length.to_be_bytes());
        self.report.message_bytes += (out.len() - start) as u64;
        self.report.script_bytes += compressed.len() as u64;
        self.report.batches += 1;
        self.script.clear();
        Ok(())
    }

    /// QEMU's stream ended: sends what is pending and the END message with the checksum. Fails
    /// when the stream was incomplete.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), ProxyError> {
        if self.ended {
            return Ok(());
        }
        self.hello(out);
        self.parser.finish();
        self.drain(out)?;
        if !self.parser.is_done() {
            return Err(ProxyError::Parse(ParseError {
                offset: self.parser.offset(),
                kind: crate::stream::ParseErrorKind::Truncated {
                    what: match self.format {
                        StreamFormat::Migration => "the migration stream",
                        StreamFormat::Nbd => "the nbd connection",
                        StreamFormat::Multifd => "the multifd channel",
                    },
                },
            }));
        }
        self.flush(out)?;
        let checksum = self.digest.finalize();
        let mut body = self.report.stream_bytes.to_be_bytes().to_vec();
        body.extend_from_slice(checksum.as_bytes());
        let start = out.len();
        put_message(out, MESSAGE_END, &body);
        self.report.message_bytes += (out.len() - start) as u64;
        self.report.stream_checksum = *checksum.as_bytes();
        self.ended = true;
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DecoderState {
    Hello,
    Streaming,
    Ended,
}

/// Destination side, sans-IO: proxy messages in, QEMU's stream bytes out (identical to the
/// source's, which the END message proves).
pub struct ProxyDecoder {
    /// The start of a message whose end has not arrived yet (empty between messages).
    pending: Vec<u8>,
    /// Message-stream offset of the next message (of `pending[0]` when it holds one).
    offset: u64,
    decoder: PageDecoder<SharedImagePages>,
    /// The disk session's record of the blocks it carries (NBD format only).
    delivering: Option<(SharedImagePages, std::sync::Arc<DeliveredPages>)>,
    mirror_page_limit: u64,
    format: StreamFormat,
    rebuilder: StreamRebuilder,
    block_names: Vec<String>,
    page_keys: Vec<(usize, u64)>,
    page_data: Vec<u8>,
    /// BLAKE3 of each page in `page_data`, for the stream digest.
    page_hashes: Vec<[u8; 32]>,
    state: DecoderState,
    report: ProxyReport,
}

impl Drop for ProxyDecoder {
    fn drop(&mut self) {
        // The disk session ended (or failed): what it did not deliver will not come.
        if let Some((_, delivered)) = &self.delivering {
            delivered.set_idle();
        }
    }
}

impl ProxyDecoder {
    /// `mirror_page_limit` must equal the source's (the hello is checked against it).
    pub fn new(config: &ProxyConfig) -> Result<Self, ProxyError> {
        let limit = config.encoder.mirror_page_limit;
        Ok(Self {
            pending: Vec::new(),
            offset: 0,
            decoder: PageDecoder::new(
                PageDecoderConfig {
                    mirror_page_limit: limit,
                    // The base image's blocks stay readable (and unchanged) while the migration
                    // runs: a page read from it is read again when needed rather than kept.
                    keep_local_content: false,
                },
                codec_view(config),
            )?,
            delivering: delivering(config),
            mirror_page_limit: limit as u64,
            format: config.format,
            rebuilder: StreamRebuilder::new(),
            block_names: Vec::new(),
            page_keys: Vec::new(),
            page_data: Vec::new(),
            page_hashes: Vec::new(),
            state: DecoderState::Hello,
            report: ProxyReport::default(),
        })
    }

    pub fn report(&self) -> ProxyReport {
        ProxyReport {
            codec: self.decoder.stats().clone(),
            ..self.report.clone()
        }
    }

    /// Whether the END message arrived and the checksum matched.
    pub fn is_complete(&self) -> bool {
        self.state == DecoderState::Ended
    }

    fn protocol(&self, offset: u64, reason: impl Into<String>) -> ProxyError {
        ProxyError::Protocol {
            offset,
            reason: reason.into(),
        }
    }

    /// Takes the next message bytes; appends rebuilt stream bytes to `out`. Whole messages are
    /// decoded where they lie in `bytes`; only a message cut by the end of `bytes` is copied,
    /// until its end arrives.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<u8>) -> Result<(), ProxyError> {
        if !self.pending.is_empty() {
            // First the message an earlier push began.
            let wanted = match self.message_length(&self.pending)? {
                Some(length) => MESSAGE_HEADER_LENGTH + length,
                None => MESSAGE_HEADER_LENGTH,
            };
            let taken = (wanted - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..taken]);
            bytes = &bytes[taken..];
            let Some(length) = self.message_length(&self.pending)? else {
                return Ok(());
            };
            if self.pending.len() < MESSAGE_HEADER_LENGTH + length {
                // The header completed just now; its body's bytes follow in `bytes`.
                let taken = (MESSAGE_HEADER_LENGTH + length - self.pending.len()).min(bytes.len());
                self.pending.extend_from_slice(&bytes[..taken]);
                bytes = &bytes[taken..];
                if self.pending.len() < MESSAGE_HEADER_LENGTH + length {
                    return Ok(());
                }
            }
            let message = std::mem::take(&mut self.pending);
            let handled = self.handle_message(&message, out);
            // Keep the allocation for the next cut message.
            self.pending = message;
            self.pending.clear();
            handled?;
        }
        while let Some(length) = self.message_length(bytes)? {
            if bytes.len() < MESSAGE_HEADER_LENGTH + length {
                break;
            }
            let (message, rest) = bytes.split_at(MESSAGE_HEADER_LENGTH + length);
            self.handle_message(message, out)?;
            bytes = rest;
        }
        self.pending.extend_from_slice(bytes);
        Ok(())
    }

    /// The body length of the message `bytes` begins with, once its header is there.
    fn message_length(&self, bytes: &[u8]) -> Result<Option<usize>, ProxyError> {
        let Some(header) = bytes.get(..MESSAGE_HEADER_LENGTH) else {
            return Ok(None);
        };
        let length = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        if length > MAX_MESSAGE_LENGTH {
            return Err(self.protocol(
                self.offset,
                format!("message of {length} bytes, above the limit of {MAX_MESSAGE_LENGTH}"),
            ));
        }
        Ok(Some(length))
    }

    /// Decodes one whole message (header and body).
    fn handle_message(&mut self, message: &[u8], out: &mut Vec<u8>) -> Result<(), ProxyError> {
        let offset = self.offset;
        self.offset += message.len() as u64;
        self.report.message_bytes += message.len() as u64;
        self.handle(offset, message[0], &message[MESSAGE_HEADER_LENGTH..], out)
    }

    fn handle(
        &mut self,
        offset: u64,
        kind: u8,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ProxyError> {
        match (self.state, kind) {
            (DecoderState::Hello, MESSAGE_HELLO) => {
                let magic = self.format.hello_magic();
                if body.len() != magic.len() + 1 + 8 || &body[..5] != magic {
                    return Err(
                        self.protocol(offset, format!("not a proxy hello for {:?}", self.format))
                    );
                }
                if body[5] != PROXY_VERSION {
                    return Err(self.protocol(
                        offset,
                        format!(
                            "proxy version {}, this build speaks version {PROXY_VERSION}",
                            body[5]
                        ),
                    ));
                }
                let mut limit = [0u8; 8];
                limit.copy_from_slice(&body[6..14]);
                let limit = u64::from_be_bytes(limit);
                if limit != self.mirror_page_limit {
                    return Err(self.protocol(
                        offset,
                        format!(
                            "the source's page mirror limit is {limit}, this side's is {}",
                            self.mirror_page_limit
                        ),
                    ));
                }
                self.state = DecoderState::Streaming;
                Ok(())
            }
            (DecoderState::Streaming, MESSAGE_BATCH) => self.handle_batch(offset, body, out),
            (DecoderState::Streaming, MESSAGE_END) => {
                if body.len() != 8 + 32 {
                    return Err(self.protocol(offset, "end message is not 40 bytes"));
                }
                let mut length = [0u8; 8];
                length.copy_from_slice(&body[..8]);
                let expected_length = u64::from_be_bytes(length);
                let mut expected = [0u8; 32];
                expected.copy_from_slice(&body[8..]);
                let actual = self.rebuilder.checksum();
                if expected_length != self.rebuilder.length() || *actual.as_bytes() != expected {
                    return Err(ProxyError::ChecksumMismatch {
                        expected_length,
                        expected: blake3::Hash::from_bytes(expected).to_hex().to_string(),
                        actual_length: self.rebuilder.length(),
                        actual: actual.to_hex().to_string(),
                    });
                }
                self.report.stream_checksum = expected;
                self.state = DecoderState::Ended;
                Ok(())
            }
            (state, kind) => Err(self.protocol(
                offset,
                format!("message kind {kind} is not expected in state {state:?}"),
            )),
        }
    }

    fn handle_batch(
        &mut self,
        offset: u64,
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), ProxyError> {
        if body.len() < 8 {
            return Err(self.protocol(offset, "batch shorter than its header"));
        }
        let script_length = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
        let compressed_length = u32::from_be_bytes([body[4], body[5], body[6], body[7]]) as usize;
        if script_length > MAX_SCRIPT_LENGTH {
            return Err(self.protocol(
                offset,
                format!("script of {script_length} bytes, above the limit of {MAX_SCRIPT_LENGTH}"),
            ));
        }
        if compressed_length > body.len() - 8 {
            return Err(self.protocol(offset, "compressed script longer than the batch"));
        }
        let script = zstd::bulk::decompress(&body[8..8 + compressed_length], script_length)
            .map_err(|error| {
                self.protocol(offset, format!("script does not decompress: {error}"))
            })?;
        if script.len() != script_length {
            return Err(self.protocol(offset, "script length differs from its header"));
        }
        let frame = &body[8 + compressed_length..];
        self.page_keys.clear();
        self.page_data.clear();
        self.page_hashes.clear();
        if !frame.is_empty() {
            let Self {
                decoder,
                block_names,
                page_keys,
                page_data,
                page_hashes,
                delivering,
                ..
            } = self;
            decoder.decode_frame(frame, |block, page_offset, page, hash| {
                let index = match block_names.iter().position(|name| name == block) {
                    Some(index) => index,
                    None => {
                        block_names.push(block.to_owned());
                        block_names.len() - 1
                    }
                };
                page_keys.push((index, page_offset));
                page_data.extend_from_slice(page);
                page_hashes.push(*hash.as_bytes());
                if let Some((held, delivered)) = delivering {
                    record_delivered(held, delivered, *hash, page);
                }
            })?;
        }
        let mut cursor = 0usize;
        let mut next_page = 0usize;
        while cursor < script.len() {
            let op = script[cursor];
            cursor += 1;
            match op {
                OP_OPAQUE => {
                    let mut length = 0u64;
                    let mut shift = 0u32;
                    loop {
                        let Some(&byte) = script.get(cursor) else {
                            return Err(self.protocol(offset, "script ends inside a length"));
                        };
                        cursor += 1;
                        if shift > 56 {
                            return Err(self.protocol(offset, "script length varint too long"));
                        }
                        length |= u64::from(byte & 0x7f) << shift;
                        shift += 7;
                        if byte & 0x80 == 0 {
                            break;
                        }
                    }
                    let end = cursor
                        .checked_add(length as usize)
                        .filter(|&end| end <= script.len())
                        .ok_or_else(|| self.protocol(offset, "opaque run beyond the script"))?;
                    self.rebuilder.write_opaque(&script[cursor..end], out);
                    self.report.opaque_bytes += length;
                    cursor = end;
                }
                OP_PAGE_NAMED | OP_PAGE_CONTINUE | OP_PAGE_BARE => {
                    if (op == OP_PAGE_BARE) == (self.format == StreamFormat::Migration) {
                        return Err(self.protocol(
                            offset,
                            format!("script op {op:#04x} does not belong in {:?}", self.format),
                        ));
                    }
                    let Some(&(block, page_offset)) = self.page_keys.get(next_page) else {
                        return Err(self.protocol(offset, "script names more pages than the frame"));
                    };
                    let naming = match op {
                        OP_PAGE_NAMED => RecordNaming::Named,
                        OP_PAGE_CONTINUE => RecordNaming::Continue,
                        _ => RecordNaming::Bare,
                    };
                    let (pages, _) = self.page_data.as_chunks::<PAGE_SIZE>();
                    self.rebuilder.write_page(
                        &self.block_names[block],
                        page_offset,
                        naming,
                        &pages[next_page],
                        &self.page_hashes[next_page],
                        out,
                    );
                    next_page += 1;
                    self.report.pages += 1;
                }
                other => {
                    return Err(self.protocol(offset, format!("unknown script op {other:#04x}")));
                }
            }
        }
        if next_page != self.page_keys.len() {
            return Err(self.protocol(offset, "frame holds pages the script does not place"));
        }
        self.report.batches += 1;
        self.report.script_bytes += compressed_length as u64;
        self.report.stream_bytes = self.rebuilder.length();
        Ok(())
    }
}

/// Source side: reads QEMU's migration stream from `source` (the socket QEMU migrates into)
/// until it closes, and sends it over `session`. Returns once the destination has received
/// everything (the bulk stream is finished, not closed).
///
/// Give the session a small bulk send window (a few MiB, at least twice the link's
/// bandwidth-delay product): QEMU sees only how fast this proxy takes its bytes, so everything
/// queued beyond the link is data the guest's final pause waits for. Measured at 100 Mbit/s,
/// 50 ms RTT: a 32 MiB window gave a 3.2 s pause (source STOP to destination RESUME), 4 MiB
/// gave 0.87 s, with the same total time.
pub async fn send_migration_stream(
    mut source: impl AsyncRead + Unpin,
    session: &Session,
    config: &ProxyConfig,
) -> Result<ProxyReport, ProxyError> {
    let encoder = ProxyEncoder::new(config)?;
    let (input, encoder_input) = tokio::sync::mpsc::channel(READ_AHEAD_CHUNKS);
    let (encoder_output, mut output) = tokio::sync::mpsc::channel(OUTPUT_CHUNKS);
    // Read buffers go back to the reader once encoded: fresh memory costs page faults.
    let (recycle, mut recycled) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let control = config.window_control.clone();
    let codec = tokio::task::spawn_blocking(move || {
        encode_stream(encoder, encoder_input, encoder_output, recycle, &control)
    });
    let read_size = config.read_size.max(PAGE_SIZE);
    let idle_flush = config.idle_flush;
    // QEMU's stream bytes read so far, against the message bytes sent: the send window's floor
    // counts in stream bytes.
    let stream_read = std::sync::atomic::AtomicU64::new(0);
    let stream_read_here = &stream_read;
    let reading_control = config.window_control.clone();
    let reading = async move {
        // Flushes asked of the encoder so far.
        let mut flushes = 0u64;
        loop {
            if reading_control.draining() {
                // Nothing more from QEMU while the session drains: what it has not written yet
                // is not ahead of what it writes next. What the encoder holds goes out.
                if input.send(EncoderInput::Flush).await.is_err() {
                    return Ok(());
                }
                flushes += 1;
                reading_control.park(flushes);
                reading_control.wait_until_draining_is(false).await;
                reading_control.park(0);
            }
            // Read into spare capacity: no zeroing of a buffer about to be overwritten.
            let mut buffer = recycled.try_recv().unwrap_or_default();
            buffer.clear();
            buffer.reserve(read_size);
            let read = match tokio::time::timeout(idle_flush, source.read_buf(&mut buffer)).await {
                Ok(read) => read,
                Err(_idle) => {
                    // QEMU paused writing (rate limit, end of a pass): send what is pending.
                    if input.send(EncoderInput::Flush).await.is_err() {
                        return Ok(());
                    }
                    flushes += 1;
                    source.read_buf(&mut buffer).await
                }
            }
            .map_err(|source| ProxyError::Io {
                action: "reading qemu's migration stream",
                source,
            })?;
            stream_read_here.fetch_add(read as u64, std::sync::atomic::Ordering::Relaxed);
            let next = if read == 0 {
                EncoderInput::Finish
            } else {
                EncoderInput::Bytes(buffer)
            };
            // A closed channel: the encoder stopped, and says why.
            if input.send(next).await.is_err() || read == 0 {
                return Ok(());
            }
        }
    };
    let sending = async {
        let mut window = config
            .adaptive_send_window_minimum
            .map(|minimum| SendWindow::new(session, minimum, config));
        let control = &config.window_control;
        let sends = async {
            let mut message_bytes = 0u64;
            while let Some(messages) = output.recv().await {
                if let Some(window) = &mut window {
                    let stream_bytes = stream_read.load(std::sync::atomic::Ordering::Relaxed);
                    // The ratio once a few batches tell it (the first bytes are mostly header).
                    let ratio = if message_bytes >= 1 << 20 {
                        stream_bytes as f64 / message_bytes as f64
                    } else {
                        1.0
                    };
                    window.adapt(session, ratio);
                }
                control.admit(session, messages.len()).await;
                message_bytes += messages.len() as u64;
                session.send(Bytes::from(messages)).await?;
                SendWindowControl::count(&control.0.sent);
            }
            Ok::<_, ProxyError>(())
        };
        tokio::select! {
            sent = sends => sent,
            never = control.watch(session) => match never {},
        }
    };
    let (read, sent) = feed_and_drain(reading, sending).await;
    // Unblocks the encoder if the sending side stopped early.
    drop(output);
    let encoded = codec_result(codec, "encoding the migration stream").await?;
    sent?;
    read?;
    let report = encoded?;
    session.finish().await?;
    session.flush().await?;
    tracing::info!(
        stream_bytes = report.stream_bytes,
        message_bytes = report.message_bytes,
        pages = report.pages,
        timing = %report.timing,
        "migration stream sent"
    );
    Ok(report)
}

/// Runs `feed` (into a codec thread) and `drain` (its output) together until `drain` ends, which
/// it does once the codec thread is done, finished or failed: `feed` is then dropped if still
/// running (it may wait on QEMU or the session for nothing). `feed`'s result, if it ended.
async fn feed_and_drain(
    feed: impl std::future::Future<Output = Result<(), ProxyError>>,
    drain: impl std::future::Future<Output = Result<(), ProxyError>>,
) -> (Result<(), ProxyError>, Result<(), ProxyError>) {
    tokio::pin!(feed, drain);
    let mut fed = None;
    loop {
        tokio::select! {
            result = &mut feed, if fed.is_none() => fed = Some(result),
            drained = &mut drain => return (fed.unwrap_or(Ok(())), drained),
        }
    }
}

/// What a codec thread returned; a panic in it is an error of `action`.
async fn codec_result<T>(
    codec: tokio::task::JoinHandle<T>,
    action: &'static str,
) -> Result<T, ProxyError> {
    codec.await.map_err(|error| ProxyError::Io {
        action,
        source: std::io::Error::other(error),
    })
}

/// Chunks of QEMU's stream (up to [`ProxyConfig::read_size`] each) read ahead of the encoder,
/// so QEMU keeps writing while a chunk is encoded. Few: everything queued between QEMU and the
/// link at the switch-over is part of the guest's pause, and only the send window is sized
/// for the link (16 chunks, 4 MiB, with 1 MiB batches made the adversarial guest's pause at
/// 100 Mbit/s about 1 s; bench/migration/README.md, "The proxy's own queues").
const READ_AHEAD_CHUNKS: usize = 4;
/// Encoded messages (about [`SEND_BATCH`] each) or rebuilt stream chunks queued between a codec
/// thread and the side that sends or writes them.
const OUTPUT_CHUNKS: usize = 2;
/// Messages are handed to the session once this many bytes are pending.
const SEND_BATCH: usize = 512 << 10;

enum EncoderInput {
    Bytes(Vec<u8>),
    /// Nothing arrived for a while: emit what is pending.
    Flush,
    /// The end of QEMU's stream.
    Finish,
}

/// A codec thread's progress at debug level, every [`CodecProgress::EVERY`]: what each
/// stretch of QEMU's stream was made of (pages per tier, zstd's time) and where the thread's
/// time went, so a stretch the link idles in shows its cause.
struct CodecProgress {
    started: std::time::Instant,
    last: std::time::Instant,
}

impl CodecProgress {
    const EVERY: Duration = Duration::from_millis(250);

    fn new(started: std::time::Instant) -> Self {
        Self {
            started,
            last: started,
        }
    }

    fn due(&self) -> bool {
        tracing::enabled!(tracing::Level::DEBUG) && self.last.elapsed() >= Self::EVERY
    }

    /// `waited`: the thread's time waiting for its input, and for its output when known.
    fn log(&mut self, side: &str, report: &ProxyReport, waited: (Duration, Option<Duration>)) {
        self.last = std::time::Instant::now();
        let codec = &report.codec;
        tracing::debug!(
            side,
            seconds = self.started.elapsed().as_secs_f64(),
            stream_bytes = report.stream_bytes,
            message_bytes = report.message_bytes,
            zero = codec.zero_pages,
            known_from_transfer = codec.known_from_transfer,
            known_from_destination = codec.known_from_destination,
            delta = codec.delta_pages,
            literal = codec.literal_pages,
            zstd_seconds = codec.compression_time.as_secs_f64(),
            waiting_for_input = waited.0.as_secs_f64(),
            waiting_for_output = waited.1.map(|waited| waited.as_secs_f64()),
            "migration codec progress"
        );
    }
}

/// The encoder's thread (parsing, hashing and compressing are CPU work, kept off the runtime
/// so reading QEMU's stream and the transport run meanwhile, on the other core).
fn encode_stream(
    mut encoder: ProxyEncoder,
    mut input: tokio::sync::mpsc::Receiver<EncoderInput>,
    output: tokio::sync::mpsc::Sender<Vec<u8>>,
    recycle: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    control: &SendWindowControl,
) -> Result<ProxyReport, ProxyError> {
    let mut out = Vec::new();
    let started = std::time::Instant::now();
    let mut timing = CodecTiming::default();
    let mut emit = |out: &mut Vec<u8>| {
        if out.is_empty() {
            return Ok(());
        }
        let message = std::mem::take(out);
        SendWindowControl::count(&control.0.emitted);
        CodecTiming::wait(&mut timing.waiting_for_output, || {
            output.blocking_send(message)
        })
        .map_err(|_| ProxyError::Io {
            action: "sending the migration stream",
            source: std::io::Error::other("the sending side stopped"),
        })
    };
    let mut progress = CodecProgress::new(started);
    loop {
        let next = CodecTiming::wait(&mut timing.waiting_for_input, || input.blocking_recv());
        match next {
            Some(EncoderInput::Bytes(bytes)) => {
                let packages = encoder.postcopy_packages();
                encoder.push(&bytes, &mut out)?;
                let _ = recycle.send(bytes);
                if progress.due() {
                    // (The time waiting for output is the emitter's while it lives.)
                    let waited = (timing.waiting_for_input, None);
                    progress.log("source", &encoder.report(), waited);
                }
                if encoder.postcopy_packages() > packages {
                    // The switch to post-copy: the guest is stopped until the destination has
                    // this device state, so it goes now, not at the next batch.
                    encoder.flush(&mut out)?;
                    emit(&mut out)?;
                } else if out.len() >= SEND_BATCH {
                    emit(&mut out)?;
                }
            }
            Some(EncoderInput::Flush) => {
                encoder.flush(&mut out)?;
                emit(&mut out)?;
                SendWindowControl::count(&control.0.flushed);
            }
            Some(EncoderInput::Finish) => {
                encoder.finish(&mut out)?;
                emit(&mut out)?;
                let mut report = encoder.report();
                report.timing = timing.finished(started);
                return Ok(report);
            }
            None => {
                return Err(ProxyError::Io {
                    action: "reading qemu's migration stream",
                    source: std::io::Error::other("the reading side stopped"),
                });
            }
        }
    }
}

/// Destination side: receives the proxy messages from `session` and writes the rebuilt stream
/// into `sink` (the destination QEMU's `-incoming` socket). Succeeds only when the END message
/// arrived and the rebuilt stream's length and BLAKE3 equal the source's. Afterwards drop the
/// session: the source closes its end once everything is acknowledged, and `Session::close` on
/// this side would then wait for a peer that is gone. Decoding runs on its own thread, so the
/// destination's QEMU loads one chunk while the next is decoded.
pub async fn receive_migration_stream(
    session: &Session,
    mut sink: impl AsyncWrite + Unpin,
    config: &ProxyConfig,
) -> Result<ProxyReport, ProxyError> {
    let decoder = ProxyDecoder::new(config)?;
    // One message waits for the decoder: a message taken from the session counts as consumed
    // (see `Session::set_bulk_send_window`), and what waits here is what a pause waits for.
    let (input, decoder_input) = tokio::sync::mpsc::channel::<Bytes>(1);
    let (decoder_output, mut output) = tokio::sync::mpsc::channel(OUTPUT_CHUNKS);
    // Written chunks go back to the decoder: fresh memory costs page faults.
    let (recycle, recycled) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let codec = tokio::task::spawn_blocking(move || {
        decode_stream(decoder, decoder_input, decoder_output, recycled)
    });
    let receiving = async move {
        while let Some(bytes) = session.recv().await? {
            // A closed channel: the decoder stopped, and says why.
            if input.send(bytes).await.is_err() {
                break;
            }
        }
        Ok::<_, ProxyError>(())
    };
    let writing = async {
        while let Some(rebuilt) = output.recv().await {
            sink.write_all(&rebuilt)
                .await
                .map_err(|source| ProxyError::Io {
                    action: "writing the stream into the destination qemu",
                    source,
                })?;
            let _ = recycle.send(rebuilt);
        }
        Ok::<_, ProxyError>(())
    };
    let (received, written) = feed_and_drain(receiving, writing).await;
    // Unblocks the decoder if the writing side stopped early.
    drop(output);
    let decoded = codec_result(codec, "decoding the migration stream").await?;
    received?;
    written?;
    let decoder = decoded?;
    if !decoder.is_complete() {
        return Err(ProxyError::Protocol {
            offset: decoder.report.message_bytes,
            reason: "the source ended the session before the end of the stream".into(),
        });
    }
    sink.flush().await.map_err(|source| ProxyError::Io {
        action: "flushing the stream into the destination qemu",
        source,
    })?;
    let report = decoder.report();
    tracing::info!(
        stream_bytes = report.stream_bytes,
        message_bytes = report.message_bytes,
        pages = report.pages,
        timing = %report.timing,
        "migration stream received and verified"
    );
    Ok(report)
}

/// The decoder's thread: messages in, rebuilt stream chunks out, until the session ends.
fn decode_stream(
    mut decoder: ProxyDecoder,
    mut input: tokio::sync::mpsc::Receiver<Bytes>,
    output: tokio::sync::mpsc::Sender<Vec<u8>>,
    mut recycled: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
) -> Result<ProxyDecoder, ProxyError> {
    let started = std::time::Instant::now();
    let mut timing = CodecTiming::default();
    let mut progress = CodecProgress::new(started);
    while let Some(bytes) =
        CodecTiming::wait(&mut timing.waiting_for_input, || input.blocking_recv())
    {
        let mut out = recycled.try_recv().unwrap_or_default();
        out.clear();
        decoder.push(&bytes, &mut out)?;
        if progress.due() {
            let waited = (timing.waiting_for_input, Some(timing.waiting_for_output));
            progress.log("destination", &decoder.report(), waited);
        }
        if !out.is_empty()
            && CodecTiming::wait(&mut timing.waiting_for_output, || output.blocking_send(out))
                .is_err()
        {
            // The writing side stopped, and says why.
            break;
        }
    }
    decoder.report.timing = timing.finished(started);
    Ok(decoder)
}

/// Source side with QEMU's return path: like [`send_migration_stream`] over the socket QEMU
/// migrates into, and every byte the destination's QEMU answers (the session's bulk stream in
/// the other direction, see [`receive_migration_stream_duplex`]) is written back into that
/// socket as it arrives. Post-copy needs it (the destination asks for the pages its guest
/// touches), and so does any capability that opens a return path.
pub async fn send_migration_stream_duplex(
    socket: tokio::net::UnixStream,
    session: &std::sync::Arc<Session>,
    config: &ProxyConfig,
) -> Result<ProxyReport, ProxyError> {
    let config = ProxyConfig {
        carry_return_path: true,
        ..config.clone()
    };
    let (from_qemu, mut to_qemu) = socket.into_split();
    let answers = session.clone();
    // QEMU closes its stream only after the destination's last answer (it waits for it), so
    // nothing the return path still holds matters once the stream ends.
    let _return_path = AbortOnDrop(tokio::spawn(async move {
        while let Ok(Some(data)) = answers.recv().await {
            if to_qemu.write_all(&data).await.is_err() {
                // QEMU closed its socket: the migration is over (or failed, which the stream's
                // side reports).
                break;
            }
        }
    }));
    send_migration_stream(from_qemu, session, &config).await
}

/// Destination side with QEMU's return path: like [`receive_migration_stream`] into the
/// destination QEMU's `-incoming` socket, and whatever that QEMU writes back on the socket goes
/// to the source on the session's bulk stream (finished when QEMU closes its side).
pub async fn receive_migration_stream_duplex(
    session: &std::sync::Arc<Session>,
    socket: tokio::net::UnixStream,
    config: &ProxyConfig,
) -> Result<ProxyReport, ProxyError> {
    let (mut from_qemu, to_qemu) = socket.into_split();
    let answers = session.clone();
    // The source's QEMU closes its stream only after the last answer reached it: the return
    // path has nothing left to carry once the stream ends.
    let _return_path = AbortOnDrop(tokio::spawn(async move {
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            match from_qemu.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => {
                    if answers
                        .send(Bytes::copy_from_slice(&buffer[..read]))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let _ = answers.finish().await;
    }));
    receive_migration_stream(session, to_qemu, config).await
}

/// A duplex proxy's return path: ended with the proxy, also when its caller drops it mid-way
/// (a post-copy recovery replacing a broken session), so QEMU's socket closes whole.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{STREAM_MAGIC, STREAM_VERSION, section_type};

    fn two_pass_stream() -> Vec<u8> {
        crate::synthetic::two_pass_stream(256)
    }

    /// Steps the send window over a model link for 20 s: the rate a window carries is window /
    /// `effective_round_trip`, up to `capacity` (bytes/s); the window is always full, and held
    /// (the transport's count rises) while it, not the link, limits the rate. The base is four
    /// bandwidth-delay products at `round_trip` of the rate carried. Returns the windows in
    /// effect, one per step.
    fn model_link(
        capacity: f64,
        effective_round_trip: f64,
        round_trip: f64,
        start: u64,
    ) -> Vec<u64> {
        let budget = ProxyConfig::default().window_drain_budget.as_secs_f64();
        let minimum = 2 << 20;
        let (mut window, mut unheld_steps) = (start, 0);
        let steps = (Duration::from_secs(20).as_millis() / SendWindow::INTERVAL.as_millis()) as u32;
        (0..steps)
            .map(|_| {
                let rate = (window as f64 / effective_round_trip).min(capacity);
                let held = window as f64 / effective_round_trip < capacity;
                unheld_steps = if held { 0 } else { unheld_steps + 1 };
                window = WindowStep {
                    current: window,
                    base: ((SendWindow::FACTOR * rate * round_trip) as u64).max(minimum),
                    most: (budget * rate) as u64,
                    unheld_steps,
                }
                .next();
                window
            })
            .collect()
    }

    #[test]
    fn a_window_that_limits_the_rate_grows_until_the_link_does() {
        // 1 Gbit/s at 0.5 % loss: RTT' of 200 ms, from the 2 MiB minimum.
        let capacity = 119e6;
        let windows = model_link(capacity, 0.2, 0.05, 2 << 20);
        let fills = |window: &u64| *window as f64 >= capacity * 0.2 * 0.95;
        let reached = windows
            .iter()
            .position(fills)
            .expect("the window fills the link");
        assert!(
            SendWindow::INTERVAL * (reached as u32 + 1) <= Duration::from_secs(2),
            "filled within two seconds (step {reached}): {windows:?}"
        );
        // From there it hovers at the edge: grown while held, shrinking a tenth a step while
        // not, so the link runs at least nine tenths full and on average nearly full.
        let carried = |window: &u64| (*window as f64 / 0.2).min(capacity) / capacity;
        assert!(
            windows[reached..]
                .iter()
                .all(|window| carried(window) >= 0.9),
            "and keeps the link at least nine tenths full: {windows:?}"
        );
        let mean =
            windows[reached..].iter().map(carried).sum::<f64>() / (windows.len() - reached) as f64;
        assert!(
            mean >= 0.97,
            "on average {mean:.3} of the link: {windows:?}"
        );
        let most = capacity * ProxyConfig::default().window_drain_budget.as_secs_f64();
        assert!(
            windows.iter().all(|window| *window as f64 <= most),
            "never beyond what drains within the budget: {windows:?}"
        );
    }

    #[test]
    fn a_window_the_link_limits_shrinks_to_its_base_and_stays() {
        // 100 Mbit/s without loss, from a 25 MB first guess: the window comes down to its
        // base (four bandwidth-delay products, 2.5 MB) within four seconds and stays.
        let base = 2_500_000;
        let windows = model_link(12.5e6, 0.05, 0.05, 25_000_000);
        let settled = windows
            .iter()
            .position(|window| *window <= base)
            .expect("the window comes down to its base");
        assert!(
            SendWindow::INTERVAL * (settled as u32 + 1) <= Duration::from_secs(4),
            "at its base within four seconds (step {settled}): {windows:?}"
        );
        assert!(
            windows[settled..].iter().all(|window| *window <= base),
            "and stays there: {windows:?}"
        );
    }

    /// The first second without a forecast, stepped over a model link whose TCP ramps up:
    /// the path carries at most `ramp(t)` bytes/s at time t, and at most window /
    /// `effective_round_trip`. Returns the windows in effect, one per step.
    fn cold_start(ramp: impl Fn(f64) -> f64, effective_round_trip: f64) -> Vec<u64> {
        let minimum = 2 << 20;
        let most = 25_000_000;
        let (mut window, mut unheld_steps) = (minimum, 0);
        (1..=8u32)
            .map(|step| {
                let t = (SendWindow::INTERVAL * step).as_secs_f64();
                let held = (window as f64 / effective_round_trip) < ramp(t);
                unheld_steps = if held { 0 } else { unheld_steps + 1 };
                let rate = (window as f64 / effective_round_trip).min(ramp(t));
                window = ColdStep {
                    current: window,
                    minimum,
                    most,
                    recent_base: Some((SendWindow::FACTOR * rate * 0.05) as u64),
                    unheld_steps,
                }
                .next();
                window
            })
            .collect()
    }

    #[test]
    fn without_a_forecast_the_window_keeps_up_with_tcp_and_stays_small_on_a_slow_link() {
        // 1 Gbit/s at 0.5 % loss (RTT' 200 ms): TCP ramps from nothing to the link in 0.4 s.
        let fast = cold_start(|t| 119e6 * (t / 0.4).min(1.0), 0.2);
        let needed = 119e6 * 0.2;
        assert!(
            fast[4..]
                .iter()
                .all(|window| *window as f64 >= needed * 0.95),
            "the window fills the link from 0.6 s on: {fast:?}"
        );
        // 100 Mbit/s without loss: never more than a third of a second of the link, where the
        // guess's 25 MB were two seconds.
        let slow = cold_start(|t| 12.5e6 * (t / 0.3).min(1.0), 0.05);
        assert!(
            slow.iter().all(|window| *window as f64 <= 12.5e6 / 3.0),
            "{slow:?}"
        );
        assert_eq!(*slow.last().unwrap(), 2 << 20, "{slow:?}");
    }

    #[tokio::test]
    async fn a_drain_without_a_running_stream_says_so_at_once() {
        let control = SendWindowControl::default();
        let started = std::time::Instant::now();
        assert!(!control.drain(Duration::from_secs(30)).await);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no wait for a stream"
        );
        control.release();
        assert!(!control.draining());
    }

    fn encode(stream: &[u8], read_size: usize, flush_every_read: bool) -> (Vec<u8>, ProxyReport) {
        let config = ProxyConfig::default();
        let mut encoder = ProxyEncoder::new(&config).unwrap();
        let mut messages = Vec::new();
        for chunk in stream.chunks(read_size) {
            encoder.push(chunk, &mut messages).unwrap();
            if flush_every_read {
                encoder.flush(&mut messages).unwrap();
            }
        }
        encoder.finish(&mut messages).unwrap();
        (messages, encoder.report())
    }

    fn decode(messages: &[u8], cut: usize) -> Result<(Vec<u8>, ProxyReport), ProxyError> {
        let mut decoder = ProxyDecoder::new(&ProxyConfig::default())?;
        let mut out = Vec::new();
        for chunk in messages.chunks(cut) {
            decoder.push(chunk, &mut out)?;
        }
        assert!(decoder.is_complete());
        Ok((out, decoder.report()))
    }

    #[test]
    fn the_destination_rebuilds_the_identical_stream_from_fewer_bytes() {
        let stream = two_pass_stream();
        for (read_size, flush_every_read) in [(stream.len(), false), (1000, true), (4096, false)] {
            let (messages, sent) = encode(&stream, read_size, flush_every_read);
            for cut in [messages.len(), 1, 777] {
                let (rebuilt, received) = decode(&messages, cut).unwrap();
                assert_eq!(rebuilt, stream);
                assert_eq!(received.stream_bytes, stream.len() as u64);
                assert_eq!(
                    received.stream_checksum,
                    *crate::rebuild::stream_digest(StreamParser::new(), &stream)
                        .unwrap()
                        .as_bytes()
                );
                assert_eq!(received.pages, sent.pages);
            }
            assert_eq!(sent.pages, 2 * 192);
            assert!(
                messages.len() * 4 < stream.len(),
                "{} message bytes for {} stream bytes",
                messages.len(),
                stream.len()
            );
            let codec = &sent.codec;
            assert!(
                codec.known_from_transfer > 0 && codec.delta_pages > 0,
                "{codec:?}"
            );
        }
    }

    #[test]
    fn an_nbd_connection_rebuilds_identically_and_only_as_nbd() {
        let connection = crate::synthetic::nbd_connection();
        let config = ProxyConfig {
            format: StreamFormat::Nbd,
            ..ProxyConfig::default()
        };
        let mut encoder = ProxyEncoder::new(&config).unwrap();
        let mut messages = Vec::new();
        for chunk in connection.chunks(1000) {
            encoder.push(chunk, &mut messages).unwrap();
        }
        encoder.finish(&mut messages).unwrap();
        let sent = encoder.report();
        assert_eq!(sent.pages, 5);
        for cut in [messages.len(), 1, 333] {
            let mut decoder = ProxyDecoder::new(&config).unwrap();
            let mut rebuilt = Vec::new();
            for chunk in messages.chunks(cut) {
                decoder.push(chunk, &mut rebuilt).unwrap();
            }
            assert!(decoder.is_complete());
            assert_eq!(rebuilt, connection);
        }
        // A destination expecting QEMU's migration stream refuses it at the hello, and the
        // other way round.
        let mut wrong = ProxyDecoder::new(&ProxyConfig::default()).unwrap();
        let error = wrong.push(&messages, &mut Vec::new()).unwrap_err();
        assert!(
            error.to_string().contains("malformed proxy message"),
            "{error}"
        );
        let (migration, _) = encode(&two_pass_stream(), 4096, false);
        let mut wrong = ProxyDecoder::new(&config).unwrap();
        assert!(wrong.push(&migration, &mut Vec::new()).is_err());
        // A connection cut inside a write's payload is incomplete at the source.
        let mut encoder = ProxyEncoder::new(&config).unwrap();
        encoder.push(&connection[..200], &mut Vec::new()).unwrap();
        assert!(encoder.finish(&mut Vec::new()).is_err());
    }

    #[test]
    fn pages_of_an_image_both_sides_hold_travel_as_hashes() {
        let stream = two_pass_stream();
        // An image holding the first pass's page contents (the synthetic guest's formula).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("base.raw");
        let mut image = Vec::new();
        for index in 0..7usize {
            image.extend((0..CODEC_PAGE_SIZE).map(|position| (index % 7 + position / 64) as u8));
        }
        std::fs::write(&path, image).unwrap();
        let index = std::sync::Arc::new(crate::ImagePageIndex::build(&path).unwrap());
        let config = ProxyConfig {
            image_pages: SharedImagePages::new(Some(index)),
            ..ProxyConfig::default()
        };
        let mut encoder = ProxyEncoder::new(&config).unwrap();
        let mut messages = Vec::new();
        encoder.push(&stream, &mut messages).unwrap();
        encoder.finish(&mut messages).unwrap();
        let sent = encoder.report();
        assert!(sent.codec.known_from_destination > 0, "{:?}", sent.codec);
        let (_, plain) = encode(&stream, stream.len(), false);
        assert!(
            messages.len() < plain.message_bytes as usize,
            "fewer bytes than without"
        );

        let mut decoder = ProxyDecoder::new(&config).unwrap();
        let mut rebuilt = Vec::new();
        decoder.push(&messages, &mut rebuilt).unwrap();
        assert!(decoder.is_complete());
        assert_eq!(rebuilt, stream);

        // A destination without the image cannot rebuild it, and says so.
        let mut without = ProxyDecoder::new(&ProxyConfig::default()).unwrap();
        let mut out = Vec::new();
        assert!(without.push(&messages, &mut out).is_err());
        assert!(!without.is_complete());
    }

    #[test]
    fn memory_pages_equal_to_blocks_the_disk_session_delivered_travel_as_hashes() {
        use crate::delivered::DeliveredPages;
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let at_source = Arc::new(DeliveredPages::at_source());
        let at_destination = Arc::new(
            DeliveredPages::at_destination_with(dir.path(), 1 << 10, Duration::from_secs(60))
                .unwrap(),
        );
        let nbd = |delivered: &Arc<DeliveredPages>| ProxyConfig {
            format: StreamFormat::Nbd,
            image_pages: SharedImagePages::default().with_delivered(delivered.clone()),
            ..ProxyConfig::default()
        };
        let memory = |delivered: &Arc<DeliveredPages>| ProxyConfig {
            image_pages: SharedImagePages::default().with_delivered(delivered.clone()),
            ..ProxyConfig::default()
        };
        // The disk session writes five whole blocks (the connection's aligned writes).
        let connection = crate::synthetic::nbd_connection();
        let mut disk_encoder = ProxyEncoder::new(&nbd(&at_source)).unwrap();
        let mut disk_messages = Vec::new();
        disk_encoder.push(&connection, &mut disk_messages).unwrap();
        disk_encoder.finish(&mut disk_messages).unwrap();
        assert_eq!(at_source.len(), 5);

        // The guest's memory holds three of them (in its page cache, say) and a page of its own.
        let written = crate::synthetic::pattern(3, 1);
        let own = crate::synthetic::pattern(1, 0x55);
        let pages: Vec<&[u8]> = written.chunks(PAGE_SIZE).chain([&own[..]]).collect();
        let stream = crate::synthetic::one_pass_stream(&pages);
        let mut memory_encoder = ProxyEncoder::new(&memory(&at_source)).unwrap();
        let mut memory_messages = Vec::new();
        memory_encoder.push(&stream, &mut memory_messages).unwrap();
        memory_encoder.finish(&mut memory_messages).unwrap();
        let sent = memory_encoder.report();
        assert_eq!(sent.codec.known_from_destination, 3, "{:?}", sent.codec);
        assert_eq!(sent.codec.literal_pages, 1, "{:?}", sent.codec);
        assert_eq!(at_source.used(), 3);

        // The destination's memory session may get there first: it waits for the disk's blocks.
        let memory_side = {
            let config = memory(&at_destination);
            std::thread::spawn(move || {
                let mut decoder = ProxyDecoder::new(&config)?;
                let mut rebuilt = Vec::new();
                decoder.push(&memory_messages, &mut rebuilt)?;
                assert!(decoder.is_complete());
                Ok::<_, ProxyError>((rebuilt, memory_messages))
            })
        };
        let mut disk_decoder = ProxyDecoder::new(&nbd(&at_destination)).unwrap();
        let mut rebuilt_connection = Vec::new();
        disk_decoder
            .push(&disk_messages, &mut rebuilt_connection)
            .unwrap();
        assert_eq!(rebuilt_connection, connection);
        let (rebuilt, memory_messages) = memory_side.join().unwrap().unwrap();
        assert_eq!(rebuilt, stream);
        assert_eq!(at_destination.len(), 5);
        assert_eq!(at_destination.used(), 3);

        // A destination whose disk session ended without those blocks fails, without waiting.
        let empty = Arc::new(
            DeliveredPages::at_destination_with(dir.path(), 1 << 10, Duration::from_secs(600))
                .unwrap(),
        );
        drop(ProxyDecoder::new(&nbd(&empty)).unwrap());
        let mut decoder = ProxyDecoder::new(&memory(&empty)).unwrap();
        assert!(decoder.push(&memory_messages, &mut Vec::new()).is_err());
        assert!(!decoder.is_complete());
    }

    #[test]
    fn a_corrupted_or_cut_message_stream_fails_and_never_completes() {
        let stream = two_pass_stream();
        let (messages, _) = encode(&stream, 4096, false);
        // Cut short: no END, so never complete.
        let mut decoder = ProxyDecoder::new(&ProxyConfig::default()).unwrap();
        let mut out = Vec::new();
        decoder
            .push(&messages[..messages.len() - 10], &mut out)
            .unwrap();
        assert!(!decoder.is_complete());

        // Any flipped byte is caught: by the codec, the script, the framing or the checksum.
        for position in (0..messages.len()).step_by(messages.len() / 97) {
            let mut corrupted = messages.clone();
            corrupted[position] ^= 0x55;
            let mut decoder = ProxyDecoder::new(&ProxyConfig::default()).unwrap();
            let mut out = Vec::new();
            let result = decoder.push(&corrupted, &mut out);
            assert!(
                result.is_err() || !decoder.is_complete(),
                "corruption at {position} went unnoticed"
            );
        }

        // A wrong checksum in END is reported as such.
        let mut tampered = messages.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        let error = decode(&tampered, tampered.len()).expect_err("mismatch");
        assert!(
            matches!(error, ProxyError::ChecksumMismatch { .. }),
            "{error}"
        );
        assert!(error.to_string().contains("differs"), "{error}");
    }

    #[test]
    fn a_huge_message_length_is_refused_before_it_is_buffered() {
        let mut decoder = ProxyDecoder::new(&ProxyConfig::default()).unwrap();
        let mut out = Vec::new();
        let error = decoder
            .push(&[MESSAGE_HELLO, 0xff, 0xff, 0xff, 0xff], &mut out)
            .unwrap_err();
        assert!(error.to_string().contains("above the limit"), "{error}");
    }

    #[test]
    fn sides_that_disagree_on_the_mirror_limit_or_version_are_refused_at_the_hello() {
        let stream = two_pass_stream();
        let (messages, _) = encode(&stream, stream.len(), false);
        let mut config = ProxyConfig::default();
        config.encoder.mirror_page_limit = 4096;
        let mut decoder = ProxyDecoder::new(&config).unwrap();
        let error = decoder.push(&messages, &mut Vec::new()).unwrap_err();
        assert!(error.to_string().contains("mirror limit"), "{error}");

        let mut newer = messages.clone();
        newer[MESSAGE_HEADER_LENGTH + HELLO_MAGIC.len()] = PROXY_VERSION + 1;
        let mut decoder = ProxyDecoder::new(&ProxyConfig::default()).unwrap();
        let error = decoder.push(&newer, &mut Vec::new()).unwrap_err();
        assert!(
            error
                .to_string()
                .contains(&format!("this build speaks version {PROXY_VERSION}")),
            "{error}"
        );
    }

    /// What QEMU 10.0 sent when a paused post-copy resumed (`migrate` with `resume: true`),
    /// in shape: a `RECV_BITMAP` command per RAM block, `POSTCOPY_RESUME`, then RAM `PART`
    /// sections of a section id started in the stream that broke, and the END with EOF.
    fn resumed_postcopy_stream() -> Vec<u8> {
        let mut stream = Vec::new();
        for block in ["pc.ram", "/rom@etc/acpi/tables"] {
            stream.extend_from_slice(&[section_type::COMMAND, 0, 10, 0, block.len() as u8 + 1]);
            stream.push(block.len() as u8);
            stream.extend_from_slice(block.as_bytes());
        }
        stream.extend_from_slice(&[section_type::COMMAND, 0, 9, 0, 0]);
        for (index, end) in [(0u64, false), (1, true)] {
            let kind = if end {
                section_type::END
            } else {
                section_type::PART
            };
            stream.extend_from_slice(&[kind, 0, 0, 0, 1]);
            stream.extend_from_slice(&((index << 12) | 0x08).to_be_bytes());
            stream.extend_from_slice(&[6]);
            stream.extend_from_slice(b"pc.ram");
            stream.extend_from_slice(&[index as u8 + 1; 4096]);
            stream.extend_from_slice(&0x10u64.to_be_bytes());
        }
        stream.push(section_type::EOF);
        stream
    }

    #[test]
    fn codec_timing_counts_the_waits_and_the_rest_as_work() {
        let started = std::time::Instant::now();
        let mut timing = CodecTiming::default();
        let (_sender, receiver) = std::sync::mpsc::channel::<()>();
        let waited = CodecTiming::wait(&mut timing.waiting_for_input, || {
            receiver.recv_timeout(Duration::from_millis(30))
        });
        assert!(waited.is_err(), "nothing was sent");
        let mut work = 0u64;
        for value in 0..1_000_000u64 {
            work = work.wrapping_add(std::hint::black_box(value));
        }
        std::hint::black_box(work);
        let timing = timing.finished(started);
        let elapsed = started.elapsed();
        assert!(
            timing.waiting_for_input >= Duration::from_millis(30),
            "{timing}"
        );
        assert_eq!(timing.waiting_for_output, Duration::ZERO);
        assert!(
            timing.working + timing.waiting_for_input <= elapsed,
            "{timing} in {elapsed:?}"
        );
        assert!(timing.to_string().starts_with("codec working "), "{timing}");
    }

    #[test]
    fn a_resumed_post_copy_stream_is_carried_whole_only_when_said_to_be_one() {
        let stream = resumed_postcopy_stream();
        let config = ProxyConfig {
            resumed_postcopy: true,
            carry_return_path: true,
            ..ProxyConfig::default()
        };
        let mut encoder = ProxyEncoder::new(&config).unwrap();
        let mut messages = Vec::new();
        for chunk in stream.chunks(1000) {
            encoder.push(chunk, &mut messages).unwrap();
        }
        encoder.finish(&mut messages).unwrap();
        let sent = encoder.report();
        assert_eq!(sent.pages, 0, "carried opaque");
        assert_eq!(sent.opaque_bytes, stream.len() as u64);
        assert!(
            messages.len() < stream.len(),
            "compressed: {}",
            messages.len()
        );
        let (rebuilt, received) = decode(&messages, 333).unwrap();
        assert_eq!(rebuilt, stream);
        // All opaque: its stream digest is the BLAKE3 of its bytes.
        assert_eq!(received.stream_checksum, *blake3::hash(&stream).as_bytes());

        // Read as the start of a migration, it is refused: no header.
        let mut encoder = ProxyEncoder::new(&ProxyConfig::default()).unwrap();
        let error = encoder.push(&stream, &mut Vec::new()).unwrap_err();
        assert!(
            matches!(&error, ProxyError::Parse(parse) if parse.offset == 0),
            "{error:?}"
        );
    }

    #[test]
    fn a_source_asking_for_a_return_path_is_refused() {
        let mut stream = STREAM_MAGIC.to_be_bytes().to_vec();
        stream.extend_from_slice(&STREAM_VERSION.to_be_bytes());
        stream.extend_from_slice(&[section_type::COMMAND, 0, 1, 0, 0]);
        let mut encoder = ProxyEncoder::new(&ProxyConfig::default()).unwrap();
        let error = encoder.push(&stream, &mut Vec::new()).unwrap_err();
        assert!(matches!(error, ProxyError::ReturnPathRequested), "{error}");
    }
}
