//! A two-host emulated WAN link: namespaces `A` and `B`, each with a TUN device `wan0`, and the
//! forwarder threads of this process in between. Built with [`LinkEmulator::builder`]; the
//! returned [`RunningLink`] tears everything down when dropped.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::LinkError;
use crate::forwarder::{Direction, DirectionCountersSnapshot, DirectionHandle, spawn_direction};
use crate::model::{Capacity, DirectionModel, DirectionShape};
use crate::netns;
use crate::sys::{self, DeviceKind};
use crate::trace::DeliveryTrace;

/// Name of the emulated interface inside each namespace of a [`RunningLink`].
pub const LINK_INTERFACE: &str = "wan0";

/// Socket buffer limits set in every namespace: TCP can grow to 64 MiB (1 Gbit/s at 100+ ms
/// RTT), and UDP sockets get 4 MiB receive buffers so bursts released by the emulator are not
/// dropped by the receiving socket. Each is best effort (older kernels keep some global).
pub(crate) const SOCKET_BUFFER_SYSCTLS: [(&str, &str); 5] = [
    ("net.ipv4.tcp_rmem", "4096 131072 67108864"),
    ("net.ipv4.tcp_wmem", "4096 16384 67108864"),
    ("net.core.rmem_max", "67108864"),
    ("net.core.wmem_max", "67108864"),
    ("net.core.rmem_default", "4194304"),
];

/// Applies [`SOCKET_BUFFER_SYSCTLS`] in `namespace`, logging (not failing on) each refusal.
pub(crate) fn tune_socket_buffers(namespace: &str) {
    for setting in SOCKET_BUFFER_SYSCTLS {
        if let Err(error) = netns::set_sysctls(namespace, &[setting]) {
            tracing::debug!(%namespace, %error, "socket buffer limit left at its default");
        }
    }
}

/// SCHED_FIFO priority of forwarder threads: above every normal thread, below kernel threads
/// that use real-time priorities (which start at 50).
const REALTIME_PRIORITY: i32 = 10;

/// Entry point: `LinkEmulator::builder()`.
#[derive(Debug)]
pub struct LinkEmulator;

impl LinkEmulator {
    /// A builder with no delay, no loss, unlimited rate.
    pub fn builder() -> LinkBuilder {
        LinkBuilder::default()
    }
}

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LinkDirection {
    /// From namespace A to namespace B.
    AToB,
    /// From namespace B to namespace A.
    BToA,
}

/// Settings for a [`RunningLink`]; every setter without a direction applies to both.
#[derive(Debug, Clone)]
pub struct LinkBuilder {
    name_prefix: String,
    a_to_b: DirectionShape,
    b_to_a: DirectionShape,
    trace_a_to_b: Option<PathBuf>,
    trace_b_to_a: Option<PathBuf>,
    seed: u64,
    address_a: Ipv4Addr,
    address_b: Ipv4Addr,
    prefix_length: u8,
    mtu: u32,
    device_queue_packets: u32,
    segmentation_offload: bool,
    release_granularity: Duration,
}

impl Default for LinkBuilder {
    fn default() -> Self {
        Self {
            name_prefix: "link".to_owned(),
            a_to_b: DirectionShape::default(),
            b_to_a: DirectionShape::default(),
            trace_a_to_b: None,
            trace_b_to_a: None,
            seed: 1,
            address_a: Ipv4Addr::new(10, 77, 0, 1),
            address_b: Ipv4Addr::new(10, 77, 0, 2),
            prefix_length: 24,
            mtu: 1500,
            device_queue_packets: 5000,
            segmentation_offload: false,
            release_granularity: DEFAULT_RELEASE_GRANULARITY,
        }
    }
}

impl LinkBuilder {
    /// Short tag (a-z, 0-9, at most 16) in the namespace names, to tell instances apart.
    pub fn name_prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.name_prefix);
        self
    }
    /// One-way delay, both directions (RTT is twice this).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.a_to_b.delay = delay;
        self.b_to_a.delay = delay;
        self
    }
    /// Uniform jitter of ± this around the delay, both directions; order is kept unless
    /// [`Self::allow_reordering`], by holding a packet until the one before it is delivered,
    /// so with packets closer together than the jitter the mean delay rises towards
    /// `delay + jitter`.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.a_to_b.jitter = jitter;
        self.b_to_a.jitter = jitter;
        self
    }
    /// Let jitter reorder packets.
    pub fn allow_reordering(mut self, allow: bool) -> Self {
        self.a_to_b.allow_reordering = allow;
        self.b_to_a.allow_reordering = allow;
        self
    }
    /// Random loss probability in `[0, 1]` per packet, both directions (0.005 is 0.5 %).
    pub fn loss(mut self, probability: f64) -> Self {
        self.a_to_b.loss = probability;
        self.b_to_a.loss = probability;
        self
    }
    /// Fixed rate in bits per second, both directions (IP bytes are counted).
    pub fn rate_bits_per_sec(mut self, bits_per_second: f64) -> Self {
        let capacity = Capacity::BitsPerSecond(bits_per_second.max(1.0) as u64);
        self.a_to_b.capacity = capacity.clone();
        self.b_to_a.capacity = capacity;
        self
    }
    /// Replays a delivery-opportunity trace as the capacity of both directions.
    pub fn trace(mut self, path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        self.trace_a_to_b = Some(path.clone());
        self.trace_b_to_a = Some(path);
        self
    }
    /// Trace for A→B only (for example a `.down` file when B is the mobile client).
    pub fn trace_a_to_b(mut self, path: impl Into<PathBuf>) -> Self {
        self.trace_a_to_b = Some(path.into());
        self
    }
    /// Trace for B→A only.
    pub fn trace_b_to_a(mut self, path: impl Into<PathBuf>) -> Self {
        self.trace_b_to_a = Some(path.into());
        self
    }
    /// Drop-tail limit of the bottleneck queue, both directions (default: about one BDP).
    pub fn queue_bytes(mut self, bytes: u64) -> Self {
        self.a_to_b.queue_bytes = Some(bytes);
        self.b_to_a.queue_bytes = Some(bytes);
        self
    }
    /// Seed for loss and jitter (each direction derives its own stream from it).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
    /// One-way delay of one direction only.
    pub fn delay_for(mut self, direction: LinkDirection, delay: Duration) -> Self {
        self.shape_mut(direction).delay = delay;
        self
    }
    /// Loss probability of one direction only.
    pub fn loss_for(mut self, direction: LinkDirection, probability: f64) -> Self {
        self.shape_mut(direction).loss = probability;
        self
    }
    /// Fixed rate of one direction only (asymmetric links).
    pub fn rate_for(mut self, direction: LinkDirection, bits_per_second: f64) -> Self {
        self.shape_mut(direction).capacity =
            Capacity::BitsPerSecond(bits_per_second.max(1.0) as u64);
        self
    }
    fn shape_mut(&mut self, direction: LinkDirection) -> &mut DirectionShape {
        match direction {
            LinkDirection::AToB => &mut self.a_to_b,
            LinkDirection::BToA => &mut self.b_to_a,
        }
    }
    /// Replaces the whole shape of one direction (a trace set by path still wins).
    pub fn direction(mut self, direction: LinkDirection, shape: DirectionShape) -> Self {
        match direction {
            LinkDirection::AToB => self.a_to_b = shape,
            LinkDirection::BToA => self.b_to_a = shape,
        }
        self
    }
    /// Addresses of A and B on the link and the prefix length (default 10.77.0.1/24 and
    /// 10.77.0.2/24; every link has its own namespaces, so reusing them is fine).
    pub fn addresses(mut self, a: Ipv4Addr, b: Ipv4Addr, prefix_length: u8) -> Self {
        self.address_a = a;
        self.address_b = b;
        self.prefix_length = prefix_length;
        self
    }
    /// MTU of the link devices (default 1500, so the model sees 1500-byte packets).
    pub fn mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }
    /// Length of each device's transmit queue, packets (default 5000): absorbs scheduling
    /// hiccups of the forwarder without drops that the model did not decide.
    pub fn device_queue_packets(mut self, packets: u32) -> Self {
        self.device_queue_packets = packets;
        self
    }

    /// Let TCP super-packets (up to 64 KiB, `IFF_VNET_HDR` with TSO) cross the link instead of
    /// 1500-byte packets: several times less CPU per byte. The model still acts per wire
    /// segment (each is admitted, lost or queued on its own; survivors are re-assembled into
    /// smaller super-packets), but a super-packet's segments are delivered together when the
    /// last of them is due, so delivery is burstier by up to one super-packet's serialization
    /// time (0.5 ms at 1 Gbit/s). Off by default.
    pub fn segmentation_offload(mut self, enabled: bool) -> Self {
        self.segmentation_offload = enabled;
        self
    }

    /// How precisely delayed packets are released: a forwarder thread wakes for them only on
    /// multiples of this, so a packet may leave up to this much late (never early). Default
    /// 200 µs (0.4 % of a 50 ms RTT), which more than halves the forwarder's CPU on a shaped
    /// 100 Mbit/s link compared with one wake-up per packet; `Duration::ZERO` is exact.
    pub fn release_granularity(mut self, granularity: Duration) -> Self {
        self.release_granularity = granularity;
        self
    }

    /// Creates the namespaces and devices and starts the forwarder.
    pub fn spawn(self) -> Result<RunningLink, LinkError> {
        if !(68..=65535).contains(&self.mtu) {
            return Err(LinkError::InvalidConfiguration {
                reason: format!("mtu {} is outside 68..=65535", self.mtu),
            });
        }
        if self.prefix_length > 30 || self.address_a == self.address_b {
            return Err(LinkError::InvalidConfiguration {
                reason: "addresses must differ and the prefix be at most /30".to_owned(),
            });
        }
        let mut a_to_b = self.a_to_b.clone();
        let mut b_to_a = self.b_to_a.clone();
        for (shape, path) in [
            (&mut a_to_b, &self.trace_a_to_b),
            (&mut b_to_a, &self.trace_b_to_a),
        ] {
            if let Some(path) = path {
                shape.capacity = Capacity::Trace(Arc::new(DeliveryTrace::from_file(path)?));
            }
            for value in [shape.loss] {
                if !(0.0..=1.0).contains(&value) {
                    return Err(LinkError::InvalidConfiguration {
                        reason: format!("loss {value} is outside 0..=1"),
                    });
                }
            }
        }
        if let Err(error) = netns::cleanup_stale() {
            tracing::warn!(%error, "could not remove leftovers of killed runs");
        }
        let instance = netns::unique_instance_name(&self.name_prefix)?;
        let mut namespaces = NamespaceGuard::default();
        let namespace_a = format!("{instance}-a");
        let namespace_b = format!("{instance}-b");
        namespaces.create(&namespace_a)?;
        namespaces.create(&namespace_b)?;
        let kind = if self.segmentation_offload {
            DeviceKind::OffloadingTun
        } else {
            DeviceKind::Tun
        };
        let device_a = attach_device(kind, &namespace_a, LINK_INTERFACE)?;
        let device_b = attach_device(kind, &namespace_b, LINK_INTERFACE)?;
        for (namespace, address) in [
            (&namespace_a, self.address_a),
            (&namespace_b, self.address_b),
        ] {
            let mtu = self.mtu.to_string();
            let queue = self.device_queue_packets.to_string();
            netns::ip_in(
                namespace,
                &[
                    "link",
                    "set",
                    "dev",
                    LINK_INTERFACE,
                    "mtu",
                    &mtu,
                    "txqueuelen",
                    &queue,
                ],
            )?;
            let cidr = format!("{address}/{}", self.prefix_length);
            netns::ip_in(namespace, &["addr", "add", &cidr, "dev", LINK_INTERFACE])?;
            netns::ip_in(namespace, &["link", "set", "dev", LINK_INTERFACE, "up"])?;
            tune_socket_buffers(namespace);
        }
        let round_trip = a_to_b.delay + b_to_a.delay;
        let models = [
            DirectionModel::new(&a_to_b, round_trip, self.seed),
            DirectionModel::new(&b_to_a, round_trip, self.seed ^ 0x5bd1_e995_0000_0001),
        ];
        let queue_limits = [models[0].queue_limit_bytes(), models[1].queue_limit_bytes()];
        let buffer_size = if self.segmentation_offload {
            65536 + 64
        } else {
            self.mtu as usize + 64
        };
        let forwarder = ForwarderPair::start(
            &instance,
            device_a,
            device_b,
            models,
            ForwarderOptions {
                buffer_size,
                segmentation_offload: self.segmentation_offload,
                release_granularity: self.release_granularity,
            },
        )?;
        tracing::info!(
            namespace_a = %namespace_a,
            namespace_b = %namespace_b,
            "emulated link up"
        );
        Ok(RunningLink {
            forwarder,
            namespaces,
            namespace_a,
            namespace_b,
            address_a: self.address_a,
            address_b: self.address_b,
            shapes: Mutex::new([a_to_b, b_to_a]),
            queue_limits: Mutex::new(queue_limits),
            seed: self.seed,
            reshapes: AtomicU64::new(0),
        })
    }
}

/// Counters of both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkCounters {
    /// A→B.
    pub a_to_b: DirectionCountersSnapshot,
    /// B→A.
    pub b_to_a: DirectionCountersSnapshot,
}

/// A running emulated link. Dropping it stops the forwarder and deletes both namespaces.
#[derive(Debug)]
pub struct RunningLink {
    forwarder: ForwarderPair,
    namespaces: NamespaceGuard,
    namespace_a: String,
    namespace_b: String,
    address_a: Ipv4Addr,
    address_b: Ipv4Addr,
    shapes: Mutex<[DirectionShape; 2]>,
    queue_limits: Mutex<[u64; 2]>,
    seed: u64,
    reshapes: AtomicU64,
}

fn index_of(direction: LinkDirection) -> usize {
    match direction {
        LinkDirection::AToB => 0,
        LinkDirection::BToA => 1,
    }
}

impl RunningLink {
    /// Name of namespace A (for `ip netns exec`).
    pub fn ns_a(&self) -> &str {
        &self.namespace_a
    }
    /// Name of namespace B.
    pub fn ns_b(&self) -> &str {
        &self.namespace_b
    }
    /// Address of A on the link.
    pub fn addr_a(&self) -> Ipv4Addr {
        self.address_a
    }
    /// Address of B on the link.
    pub fn addr_b(&self) -> Ipv4Addr {
        self.address_b
    }
    /// The shape a direction has now (traces resolved).
    pub fn shape(&self, direction: LinkDirection) -> DirectionShape {
        self.shapes.lock().unwrap_or_else(PoisonError::into_inner)[index_of(direction)].clone()
    }
    /// The drop-tail limit in force for a direction, bytes.
    pub fn queue_limit_bytes(&self, direction: LinkDirection) -> u64 {
        self.queue_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)[index_of(direction)]
    }
    /// Changes a direction's shape while the link runs (a capacity drop, a loss burst): packets
    /// already past the bottleneck keep their delivery times, new ones follow the new shape,
    /// and the bottleneck queue starts empty. The loss and jitter streams are reseeded from the
    /// link's seed and the number of reshapes, so a scripted sequence stays reproducible.
    pub fn set_shape(&self, direction: LinkDirection, shape: DirectionShape) {
        let index = index_of(direction);
        let mut shapes = self.shapes.lock().unwrap_or_else(PoisonError::into_inner);
        shapes[index] = shape;
        let round_trip = shapes[0].delay + shapes[1].delay;
        let generation = self.reshapes.fetch_add(1, Ordering::Relaxed) + 1;
        let seed = self.seed ^ generation.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index as u64;
        let model = DirectionModel::new(&shapes[index], round_trip, seed);
        self.queue_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)[index] = model.queue_limit_bytes();
        self.forwarder.handles[index].replace_model(model);
    }
    /// Time on the link's clock: traces are replayed from 0 at spawn, so opportunity `k` of a
    /// trace happens when this reads `trace.opportunity_time_ns(k)`.
    pub fn elapsed(&self) -> Duration {
        self.forwarder.clock_start.elapsed()
    }
    /// `ip netns exec <ns A> <program>`; add arguments and run it as usual.
    pub fn command_in_a(&self, program: &str) -> Command {
        netns::command_in(&self.namespace_a, program)
    }
    /// `ip netns exec <ns B> <program>`.
    pub fn command_in_b(&self, program: &str) -> Command {
        netns::command_in(&self.namespace_b, program)
    }
    /// Runs `work` on a thread inside namespace A (for example to bind sockets there).
    pub fn in_ns_a<T: Send, F: FnOnce() -> T + Send>(&self, work: F) -> Result<T, LinkError> {
        netns::in_namespace(&self.namespace_a, work)
    }
    /// Runs `work` on a thread inside namespace B.
    pub fn in_ns_b<T: Send, F: FnOnce() -> T + Send>(&self, work: F) -> Result<T, LinkError> {
        netns::in_namespace(&self.namespace_b, work)
    }
    /// Live counters of both directions.
    pub fn counters(&self) -> LinkCounters {
        LinkCounters {
            a_to_b: self.forwarder.handles[0].counters.snapshot(),
            b_to_a: self.forwarder.handles[1].counters.snapshot(),
        }
    }
    /// Cuts (false) or restores (true) one direction: while cut, every packet is dropped.
    pub fn set_direction_connected(&self, direction: LinkDirection, connected: bool) {
        self.forwarder.handles[index_of(direction)]
            .disconnected
            .store(!connected, Ordering::Relaxed);
    }
    /// Cuts or restores both directions (a partition between A and B).
    pub fn set_connected(&self, connected: bool) {
        self.set_direction_connected(LinkDirection::AToB, connected);
        self.set_direction_connected(LinkDirection::BToA, connected);
    }
    /// Stops the forwarder and deletes the namespaces, reporting errors (drop does the same
    /// silently).
    pub fn shutdown(mut self) -> Result<(), LinkError> {
        self.forwarder.stop();
        self.namespaces.delete_all()
    }
}

impl Drop for RunningLink {
    fn drop(&mut self) {
        self.forwarder.stop();
        if let Err(error) = self.namespaces.delete_all() {
            tracing::warn!(%error, "emulated link teardown incomplete");
        }
    }
}

/// Namespaces created so far; deleted on drop, so a failed setup leaves nothing behind.
#[derive(Debug, Default)]
pub(crate) struct NamespaceGuard {
    names: Vec<String>,
}

impl NamespaceGuard {
    pub(crate) fn create(&mut self, name: &str) -> Result<(), LinkError> {
        self.names.push(name.to_owned());
        netns::create_namespace(name)
    }

    pub(crate) fn delete_all(&mut self) -> Result<(), LinkError> {
        let mut first_error = None;
        for name in self.names.drain(..).rev() {
            if let Err(error) = netns::delete_namespace(&name) {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        if let Err(error) = self.delete_all() {
            tracing::warn!(%error, "namespace teardown incomplete");
        }
    }
}

/// Creates a TUN/TAP device in the root namespace, moves it into `namespace` and renames it
/// `final_name`. The returned file keeps it alive.
pub(crate) fn attach_device(
    kind: DeviceKind,
    namespace: &str,
    final_name: &str,
) -> Result<File, LinkError> {
    let pattern = match kind {
        DeviceKind::Tun | DeviceKind::OffloadingTun => "nlet%d",
        DeviceKind::Tap => "nlep%d",
    };
    let created = match kind {
        DeviceKind::OffloadingTun => sys::create_offloading_tun_device(pattern),
        _ => sys::create_tun_device(pattern, kind),
    };
    let (file, transient_name) = created.map_err(|source| LinkError::CreateDevice {
        kind: match kind {
            DeviceKind::Tun => "tun",
            DeviceKind::OffloadingTun => "offloading tun",
            DeviceKind::Tap => "tap",
        },
        pattern: pattern.to_owned(),
        source,
    })?;
    netns::ip(&["link", "set", "dev", &transient_name, "netns", namespace])?;
    netns::ip_in(
        namespace,
        &["link", "set", "dev", &transient_name, "name", final_name],
    )?;
    Ok(file)
}

/// Default of [`LinkBuilder::release_granularity`].
pub(crate) const DEFAULT_RELEASE_GRANULARITY: Duration = Duration::from_micros(200);

/// How a [`ForwarderPair`] handles packets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwarderOptions {
    pub(crate) buffer_size: usize,
    pub(crate) segmentation_offload: bool,
    pub(crate) release_granularity: Duration,
}

/// The two forwarder threads between two devices.
#[derive(Debug)]
pub(crate) struct ForwarderPair {
    pub(crate) clock_start: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub(crate) handles: [Arc<DirectionHandle>; 2],
}

impl ForwarderPair {
    /// `models[0]` shapes device_a → device_b, `models[1]` the reverse.
    pub(crate) fn start(
        label: &str,
        device_a: File,
        device_b: File,
        models: [DirectionModel; 2],
        options: ForwarderOptions,
    ) -> Result<Self, LinkError> {
        let ForwarderOptions {
            buffer_size,
            segmentation_offload,
            release_granularity,
        } = options;
        let release_granularity_ns = u64::try_from(release_granularity.as_nanos()).unwrap_or(0);
        let device_a = Arc::new(device_a);
        let device_b = Arc::new(device_b);
        let stop = Arc::new(AtomicBool::new(false));
        let handles = [
            Arc::new(DirectionHandle::default()),
            Arc::new(DirectionHandle::default()),
        ];
        let clock_start = Instant::now();
        let mut pair = Self {
            clock_start,
            stop: Arc::clone(&stop),
            threads: Vec::new(),
            handles: handles.clone(),
        };
        let [model_a_to_b, model_b_to_a] = models;
        let directions = [
            Direction {
                label: format!("{label} a>b"),
                input: Arc::clone(&device_a),
                output: Arc::clone(&device_b),
                model: model_a_to_b,
                handle: Arc::clone(&handles[0]),
                buffer_size,
                realtime_priority: Some(REALTIME_PRIORITY),
                segmentation_offload,
                release_granularity_ns,
            },
            Direction {
                label: format!("{label} b>a"),
                input: device_b,
                output: device_a,
                model: model_b_to_a,
                handle: Arc::clone(&handles[1]),
                buffer_size,
                realtime_priority: Some(REALTIME_PRIORITY),
                segmentation_offload,
                release_granularity_ns,
            },
        ];
        for direction in directions {
            // On error `pair` is dropped, which stops the thread already started.
            pair.threads
                .push(spawn_direction(direction, clock_start, Arc::clone(&stop))?);
        }
        Ok(pair)
    }

    pub(crate) fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("forwarder thread panicked");
            }
        }
    }
}

impl Drop for ForwarderPair {
    fn drop(&mut self) {
        self.stop();
    }
}
