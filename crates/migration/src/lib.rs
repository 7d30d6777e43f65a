//! The live-migration data path (issue 5): QEMU's precopy migration stream taken apart into RAM
//! page records and opaque bytes, and put back together byte for byte.
//!
//! - [`stream`]: a sans-IO streaming parser of QEMU's migration stream (format in the crate's
//!   README) that turns bytes into [`StreamEvent`]s: RAM pages keyed by (RAM block name, offset),
//!   zero pages, and opaque bytes to pass through unchanged.
//! - [`rebuild`]: the inverse, writing the identical byte stream from those events, with a
//!   BLAKE3 checksum of what it wrote.
//! - [`nbd`]: the same for the client's half of an NBD connection (a block mirror's writes), so
//!   the proxy carries a VM's disk with the page codec too.
//! - [`multifd`]: the same for one of QEMU's multifd channels, so each channel crosses the link
//!   as its own proxied stream; [`multichannel`] carries a whole multifd migration that way, one
//!   transport session per QEMU connection.
//! - [`delivered`]: blocks a migration's disk mirror delivered, which its memory session then
//!   refers to by hash instead of sending them again.
//! - [`proxy`]: the stream proxy over a DWCP transport session: PAGE payloads re-encoded with the
//!   page codec, everything else compressed, the identical stream rebuilt at the destination and
//!   proved equal by a stream-level BLAKE3 checksum.
//!
//! This crate does not start QEMU and does not decide when to migrate; the migration state machine
//! above it does.

pub mod delivered;
#[doc(hidden)]
pub mod fuzzing;
pub mod image_pages;
pub mod initramfs;
mod input;
pub mod kernel_image;
pub mod multichannel;
pub mod multifd;
pub mod nbd;
pub mod plan;
pub mod proxy;
pub mod rebuild;
pub mod stream;
#[doc(hidden)]
pub mod synthetic;

pub use delivered::DeliveredPages;
pub use image_pages::{HeldFile, ImagePageIndex, SharedImagePages, StoredRange};
pub use multichannel::{
    PROXY_MULTIFD_CHANNELS, multifd_session_options, receive_multifd_migration,
    send_multifd_migration,
};
pub use plan::{ConvergencePlanner, Plan, PlanInputs};
pub use proxy::{
    CodecTiming, MIGRATION_PARALLEL_START, ProxyConfig, ProxyDecoder, ProxyEncoder, ProxyError,
    ProxyReport, SendWindowControl, StreamFormat, expected_send_window, migration_session_options,
    queued_wire_bytes, receive_migration_stream, receive_migration_stream_duplex,
    send_migration_stream, send_migration_stream_duplex,
};
pub use rebuild::{StreamDigest, StreamRebuilder, stream_digest};
pub use stream::{
    EventParser, PAGE_SIZE, ParseError, ParseErrorKind, Passthrough, RamPage, RecordNaming,
    StreamEvent, StreamParser, StreamStats, ZeroPage,
};
