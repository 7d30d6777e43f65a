//! `novacron-linkemu`: a userspace WAN link emulator for tests and benchmarks on one machine.
//!
//! The kernel here has `tbf` and `htb` but no `netem`, so delay, jitter, loss, rate, a bounded
//! bottleneck queue and time-varying capacity (mahimahi-format traces) are applied by forwarder
//! threads of the calling process sitting between two TUN devices, one in each of two network
//! namespaces ([`LinkEmulator`]). [`Region`] puts several hosts on a bridge, any of them behind
//! a shaped link, with per-host partitions. Everything is torn down on drop, and
//! [`cleanup_stale`] removes what killed runs left behind.
//!
//! ```no_run
//! use std::time::Duration;
//! use novacron_linkemu::LinkEmulator;
//!
//! let link = LinkEmulator::builder()
//!     .name_prefix("doc")
//!     .delay(Duration::from_millis(25))
//!     .loss(0.005)
//!     .rate_bits_per_sec(1e9)
//!     .seed(7)
//!     .spawn()?;
//! let status = link
//!     .command_in_a("iperf3")
//!     .args(["-c", &link.addr_b().to_string(), "-t", "5"])
//!     .status();
//! println!("{status:?} {:?}", link.counters());
//! # Ok::<(), novacron_linkemu::LinkError>(())
//! ```
//!
//! What this crate must not do: touch interfaces or namespaces it did not create (leftover
//! removal only deletes `nle-…` namespaces whose owning process is gone).

mod error;
mod forwarder;
mod link;
pub mod model;
pub mod netns;
mod region;
mod sys;
pub mod trace;
pub mod units;

pub use error::LinkError;
pub use forwarder::DirectionCountersSnapshot;
pub use link::{
    LINK_INTERFACE, LinkBuilder, LinkCounters, LinkDirection, LinkEmulator, RunningLink,
};
pub use model::{Capacity, DirectionShape};
pub use netns::cleanup_stale;
pub use region::{HOST_INTERFACE, HostLinkShape, Region, RegionBuilder, RegionHost, RunningRegion};
pub use trace::DeliveryTrace;
