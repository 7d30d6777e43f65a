//! A region of hosts on one LAN: a switch namespace holding bridge `br0`, and one namespace per
//! host with interface `eth0` on that bridge, at 10.78.0.<i+1>/24. A host's attachment is either a
//! plain veth pair or, when shaped, a TAP pair with this crate's forwarder in between (delay,
//! loss, rate, trace, as for [`crate::LinkEmulator`]). Any host can be cut off and reconnected
//! (a partition) by setting its bridge port down or up.

use std::net::Ipv4Addr;
use std::process::Command;

use crate::error::LinkError;
use crate::forwarder::DirectionCountersSnapshot;
use crate::link::{ForwarderPair, NamespaceGuard, attach_device, tune_socket_buffers};
use crate::model::{DirectionModel, DirectionShape};
use crate::netns;
use crate::sys::DeviceKind;

/// Interface name of a host's attachment inside its namespace.
pub const HOST_INTERFACE: &str = "eth0";
const BRIDGE: &str = "br0";

/// How a shaped host's attachment behaves in each direction.
#[derive(Debug, Clone, Default)]
pub struct HostLinkShape {
    /// Host → rest of the region.
    pub outbound: DirectionShape,
    /// Rest of the region → host.
    pub inbound: DirectionShape,
}

/// Entry point for regions.
#[derive(Debug, Clone)]
pub struct RegionBuilder {
    name_prefix: String,
    host_count: usize,
    shapes: Vec<(usize, HostLinkShape)>,
    seed: u64,
}

/// A set of hosts on a bridge: `Region::builder().hosts(3).spawn()?`.
#[derive(Debug)]
pub struct Region;

impl Region {
    /// A builder for a region of 3 hosts with unshaped links.
    pub fn builder() -> RegionBuilder {
        RegionBuilder {
            name_prefix: "region".to_owned(),
            host_count: 3,
            shapes: Vec::new(),
            seed: 1,
        }
    }
}

impl RegionBuilder {
    /// Short tag (a-z, 0-9) in the namespace names.
    pub fn name_prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.name_prefix);
        self
    }
    /// Number of hosts (1 to 250).
    pub fn hosts(mut self, count: usize) -> Self {
        self.host_count = count;
        self
    }
    /// Shapes host `host`'s attachment to the bridge.
    pub fn shape_host(mut self, host: usize, shape: HostLinkShape) -> Self {
        self.shapes.retain(|(index, _)| *index != host);
        self.shapes.push((host, shape));
        self
    }
    /// Seed for loss and jitter of shaped hosts.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Creates the switch, the hosts and their links.
    pub fn spawn(self) -> Result<RunningRegion, LinkError> {
        if !(1..=250).contains(&self.host_count) {
            return Err(LinkError::InvalidConfiguration {
                reason: format!("a region has 1 to 250 hosts, not {}", self.host_count),
            });
        }
        if let Some((host, _)) = self
            .shapes
            .iter()
            .find(|(host, _)| *host >= self.host_count)
        {
            return Err(LinkError::NoSuchHost {
                host: *host,
                host_count: self.host_count,
            });
        }
        if let Err(error) = netns::cleanup_stale() {
            tracing::warn!(%error, "could not remove leftovers of killed runs");
        }
        let instance = netns::unique_instance_name(&self.name_prefix)?;
        let mut namespaces = NamespaceGuard::default();
        let switch = format!("{instance}-sw");
        namespaces.create(&switch)?;
        netns::ip_in(&switch, &["link", "add", BRIDGE, "type", "bridge"])?;
        netns::ip_in(&switch, &["link", "set", BRIDGE, "up"])?;
        let mut hosts = Vec::with_capacity(self.host_count);
        let mut forwarders = Vec::new();
        for index in 0..self.host_count {
            let namespace = format!("{instance}-h{index}");
            namespaces.create(&namespace)?;
            let port = format!("p{index}");
            let shape = self.shapes.iter().find(|(host, _)| *host == index);
            match shape {
                None => {
                    netns::ip_in(
                        &namespace,
                        &[
                            "link",
                            "add",
                            HOST_INTERFACE,
                            "type",
                            "veth",
                            "peer",
                            "name",
                            &port,
                            "netns",
                            &switch,
                        ],
                    )?;
                }
                Some((_, shape)) => {
                    let host_device = attach_device(DeviceKind::Tap, &namespace, HOST_INTERFACE)?;
                    let switch_device = attach_device(DeviceKind::Tap, &switch, &port)?;
                    let round_trip = shape.outbound.delay + shape.inbound.delay;
                    let seed = self.seed.wrapping_add(index as u64 * 0x9e37_79b9);
                    let models = [
                        DirectionModel::new(&shape.outbound, round_trip, seed),
                        DirectionModel::new(&shape.inbound, round_trip, seed ^ 0x5bd1_e995),
                    ];
                    forwarders.push((
                        index,
                        ForwarderPair::start(
                            &format!("{instance}-h{index}"),
                            host_device,
                            switch_device,
                            models,
                            1500 + 64,
                            false,
                        )?,
                    ));
                    // Ethernet frames are up to 1514 bytes plus a VLAN tag.
                    for (device_namespace, device) in
                        [(&namespace, HOST_INTERFACE), (&switch, port.as_str())]
                    {
                        netns::ip_in(
                            device_namespace,
                            &["link", "set", "dev", device, "txqueuelen", "5000"],
                        )?;
                    }
                }
            }
            netns::ip_in(&switch, &["link", "set", "dev", &port, "master", BRIDGE])?;
            netns::ip_in(&switch, &["link", "set", "dev", &port, "up"])?;
            let address = Ipv4Addr::new(10, 78, 0, index as u8 + 1);
            let cidr = format!("{address}/24");
            netns::ip_in(&namespace, &["addr", "add", &cidr, "dev", HOST_INTERFACE])?;
            netns::ip_in(&namespace, &["link", "set", "dev", HOST_INTERFACE, "up"])?;
            tune_socket_buffers(&namespace);
            hosts.push(RegionHost {
                namespace,
                address,
                port,
            });
        }
        tracing::info!(%switch, hosts = hosts.len(), "region up");
        Ok(RunningRegion {
            forwarders,
            namespaces,
            switch,
            hosts,
        })
    }
}

/// One host of a region.
#[derive(Debug, Clone)]
pub struct RegionHost {
    namespace: String,
    address: Ipv4Addr,
    port: String,
}

impl RegionHost {
    /// The host's namespace name.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    /// The host's address on the region LAN.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }
}

/// A running region; dropping it deletes every namespace and stops every forwarder.
#[derive(Debug)]
pub struct RunningRegion {
    forwarders: Vec<(usize, ForwarderPair)>,
    namespaces: NamespaceGuard,
    switch: String,
    hosts: Vec<RegionHost>,
}

impl RunningRegion {
    /// All hosts, in index order.
    pub fn hosts(&self) -> &[RegionHost] {
        &self.hosts
    }
    /// One host.
    pub fn host(&self, index: usize) -> Result<&RegionHost, LinkError> {
        self.hosts.get(index).ok_or(LinkError::NoSuchHost {
            host: index,
            host_count: self.hosts.len(),
        })
    }
    /// The switch namespace holding the bridge.
    pub fn switch_namespace(&self) -> &str {
        &self.switch
    }
    /// `ip netns exec <host ns> <program>`.
    pub fn command_in_host(&self, index: usize, program: &str) -> Result<Command, LinkError> {
        Ok(netns::command_in(self.host(index)?.namespace(), program))
    }
    /// Runs `work` on a thread inside host `index`'s namespace.
    pub fn in_host<T: Send, F: FnOnce() -> T + Send>(
        &self,
        index: usize,
        work: F,
    ) -> Result<T, LinkError> {
        netns::in_namespace(self.host(index)?.namespace(), work)
    }
    /// Connects (true) or cuts off (false) a host: its bridge port goes up or down.
    pub fn set_host_link_up(&self, index: usize, up: bool) -> Result<(), LinkError> {
        let port = &self.host(index)?.port;
        let state = if up { "up" } else { "down" };
        netns::ip_in(&self.switch, &["link", "set", "dev", port, state]).map(drop)
    }
    /// Counters of a shaped host's attachment: (outbound, inbound); `None` for unshaped hosts.
    pub fn host_counters(
        &self,
        index: usize,
    ) -> Option<(DirectionCountersSnapshot, DirectionCountersSnapshot)> {
        self.forwarders
            .iter()
            .find(|(host, _)| *host == index)
            .map(|(_, pair)| {
                (
                    pair.handles[0].counters.snapshot(),
                    pair.handles[1].counters.snapshot(),
                )
            })
    }
}

impl Drop for RunningRegion {
    fn drop(&mut self) {
        for (_, forwarder) in &mut self.forwarders {
            forwarder.stop();
        }
        if let Err(error) = self.namespaces.delete_all() {
            tracing::warn!(%error, "region teardown incomplete");
        }
    }
}
