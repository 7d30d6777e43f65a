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
//! Why the rate is modelled in the forwarder and not with `tbf` on the TUN devices: `tbf` on a
//! TUN shapes egress from the sending namespace into the TUN, so the bottleneck queue would sit
//! in the sender's own kernel, before the delay line, where TCP small queues push back on the
//! sender instead of dropping; a WAN bottleneck is a drop-tail queue in the middle of the path.
//! The forwarder's serialization-time model gives that, exactly per packet, plus trace replay,
//! which `tbf` cannot do. The forwarder threads ask for SCHED_FIFO (root has it) so that
//! CPU-bound neighbours do not starve them; without it a loaded 2-core machine halves the
//! reachable rate at 50 ms RTT. Measured ceiling and accuracy: `bench/linkemu/README.md`.
//!
//! For rates of several hundred Mbit/s and up, [`LinkBuilder::segmentation_offload`] lets TCP
//! super-packets (TSO, up to 64 KiB) cross the TUN devices: the forwarder's ceiling rises from
//! about 2 to about 8 Gbit/s and its CPU use at 1 Gbit/s halves, while loss, queue and rate
//! still act on every 1500-byte wire segment ([`offload`]). It is off by default because a
//! super-packet's segments are delivered together, which is burstier than a real wire.
//!
//! Delayed packets are released on a 200 µs grid by default (late, never early), which cuts
//! the forwarder's CPU by a third or more; [`LinkBuilder::release_granularity`] sets it, zero is
//! exact.
//!
//! The `novacron-linkemu` binary does the same for scripts: `novacron-linkemu up --delay 25ms
//! --loss 0.5% --rate 1gbit [--trace FILE] [-- COMMAND]` prints one JSON line with the namespace
//! names and addresses, forwards until Ctrl-C/SIGTERM (or until COMMAND exits, which sees
//! `LINKEMU_NS_A`, `LINKEMU_NS_B`, `LINKEMU_ADDR_A`, `LINKEMU_ADDR_B`), then prints the counters
//! and tears down; `novacron-linkemu cleanup` removes leftovers of killed runs.
//!
//! What this crate must not do: touch interfaces or namespaces it did not create (leftover
//! removal only deletes `nle-…` namespaces whose owning process is gone).

mod error;
mod forwarder;
mod link;
pub mod model;
pub mod netns;
pub mod offload;
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

#[cfg(test)]
mod tests {
    /// Links and regions are shared with measuring threads (`std::thread::scope`), so they must
    /// stay `Send + Sync`.
    #[test]
    fn running_links_and_regions_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<crate::RunningLink>();
        shareable::<crate::RunningRegion>();
    }
}
