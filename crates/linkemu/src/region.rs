//! A region of hosts on one LAN: a switch namespace holding bridge `br0`, and one namespace per
//! host with interface `eth0` on that bridge, at 10.78.0.<i+1>/24. A host's attachment is either a
//! plain veth pair or, when shaped, a TAP pair with this crate's forwarder in between (delay,
//! loss, rate, trace, as for [`crate::LinkEmulator`]). Any host can be cut off and reconnected
//! (a partition) by setting its bridge port down or up. Hosts can be split over several sites
//! (bridges) joined through emulated links, for tests across regions.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::Ordering;

use crate::error::LinkError;
use crate::forwarder::DirectionCountersSnapshot;
use crate::link::{
    DEFAULT_RELEASE_GRANULARITY, ForwarderOptions, ForwarderPair, NamespaceGuard, attach_device,
    tune_socket_buffers,
};
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
    host_sites: Vec<usize>,
    inter_site: HostLinkShape,
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
            host_sites: Vec::new(),
            inter_site: HostLinkShape::default(),
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
    /// Splits the hosts over sites (for example two regions of a federation): `sites[i]` is
    /// host i's site, numbered from 0. Each site has its own bridge; site k > 0 reaches site 0
    /// through an emulated link shaped by [`Self::inter_site_shape`] (a star around site 0).
    /// All hosts stay in one subnet. Default: every host in site 0.
    pub fn sites(mut self, sites: &[usize]) -> Self {
        self.host_sites = sites.to_vec();
        self
    }
    /// Shape of each inter-site link: `outbound` is site k → site 0, `inbound` the reverse.
    pub fn inter_site_shape(mut self, shape: HostLinkShape) -> Self {
        self.inter_site = shape;
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
        let host_sites = if self.host_sites.is_empty() {
            vec![0; self.host_count]
        } else {
            self.host_sites.clone()
        };
        if host_sites.len() != self.host_count {
            return Err(LinkError::InvalidConfiguration {
                reason: format!(
                    "{} site numbers given for {} hosts",
                    host_sites.len(),
                    self.host_count
                ),
            });
        }
        let site_count = host_sites.iter().copied().max().unwrap_or(0) + 1;
        let mut switches = Vec::with_capacity(site_count);
        for site in 0..site_count {
            let switch = if site == 0 {
                format!("{instance}-sw")
            } else {
                format!("{instance}-sw{site}")
            };
            namespaces.create(&switch)?;
            netns::ip_in(&switch, &["link", "add", BRIDGE, "type", "bridge"])?;
            netns::ip_in(&switch, &["link", "set", BRIDGE, "up"])?;
            switches.push(switch);
        }
        let mut site_links = Vec::new();
        for site in 1..site_count {
            let far_port = "s0";
            let near_port = format!("s{site}");
            let far_device = attach_device(DeviceKind::Tap, &switches[site], far_port)?;
            let near_device = attach_device(DeviceKind::Tap, &switches[0], &near_port)?;
            let shape = &self.inter_site;
            let round_trip = shape.outbound.delay + shape.inbound.delay;
            let seed = self.seed ^ (site as u64).wrapping_mul(0x51_7cc1_b727_220a);
            let models = [
                DirectionModel::new(&shape.outbound, round_trip, seed),
                DirectionModel::new(&shape.inbound, round_trip, seed ^ 0x5bd1_e995),
            ];
            site_links.push((
                site,
                ForwarderPair::start(
                    &format!("{instance}-site{site}"),
                    far_device,
                    near_device,
                    models,
                    ForwarderOptions {
                        buffer_size: 1500 + 64,
                        segmentation_offload: false,
                        release_granularity: DEFAULT_RELEASE_GRANULARITY,
                    },
                )?,
            ));
            for (switch, port) in [
                (&switches[site], far_port),
                (&switches[0], near_port.as_str()),
            ] {
                netns::ip_in(switch, &["link", "set", "dev", port, "txqueuelen", "5000"])?;
                netns::ip_in(switch, &["link", "set", "dev", port, "master", BRIDGE])?;
                netns::ip_in(switch, &["link", "set", "dev", port, "up"])?;
            }
        }
        let mut hosts = Vec::with_capacity(self.host_count);
        let mut forwarders = Vec::new();
        for index in 0..self.host_count {
            let switch = &switches[host_sites[index]];
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
                            switch,
                        ],
                    )?;
                }
                Some((_, shape)) => {
                    let host_device = attach_device(DeviceKind::Tap, &namespace, HOST_INTERFACE)?;
                    let switch_device = attach_device(DeviceKind::Tap, switch, &port)?;
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
                            ForwarderOptions {
                                buffer_size: 1500 + 64,
                                segmentation_offload: false,
                                release_granularity: DEFAULT_RELEASE_GRANULARITY,
                            },
                        )?,
                    ));
                    // Ethernet frames are up to 1514 bytes plus a VLAN tag.
                    for (device_namespace, device) in
                        [(&namespace, HOST_INTERFACE), (switch, port.as_str())]
                    {
                        netns::ip_in(
                            device_namespace,
                            &["link", "set", "dev", device, "txqueuelen", "5000"],
                        )?;
                    }
                }
            }
            netns::ip_in(switch, &["link", "set", "dev", &port, "master", BRIDGE])?;
            netns::ip_in(switch, &["link", "set", "dev", &port, "up"])?;
            let address = Ipv4Addr::new(10, 78, 0, index as u8 + 1);
            let cidr = format!("{address}/24");
            netns::ip_in(&namespace, &["addr", "add", &cidr, "dev", HOST_INTERFACE])?;
            netns::ip_in(&namespace, &["link", "set", "dev", HOST_INTERFACE, "up"])?;
            tune_socket_buffers(&namespace);
            hosts.push(RegionHost {
                namespace,
                address,
                port,
                site: host_sites[index],
            });
        }
        tracing::info!(switch = %switches[0], hosts = hosts.len(), sites = site_count, "region up");
        Ok(RunningRegion {
            forwarders,
            site_links,
            namespaces,
            switches,
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
    site: usize,
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
    /// The site the host is in (0 unless [`RegionBuilder::sites`] was used).
    pub fn site(&self) -> usize {
        self.site
    }
}

/// A running region; dropping it deletes every namespace and stops every forwarder.
#[derive(Debug)]
pub struct RunningRegion {
    forwarders: Vec<(usize, ForwarderPair)>,
    site_links: Vec<(usize, ForwarderPair)>,
    namespaces: NamespaceGuard,
    switches: Vec<String>,
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
    /// The switch namespace holding site 0's bridge.
    pub fn switch_namespace(&self) -> &str {
        &self.switches[0]
    }
    /// Cuts (false) or restores (true) the emulated link between site `site` (> 0) and site 0:
    /// a partition between sites, while hosts within each site still reach each other.
    pub fn set_site_connected(&self, site: usize, connected: bool) -> Result<(), LinkError> {
        let (_, pair) = self
            .site_links
            .iter()
            .find(|(index, _)| *index == site)
            .ok_or_else(|| LinkError::InvalidConfiguration {
                reason: format!("site {site} has no link to site 0 in this region"),
            })?;
        for handle in &pair.handles {
            handle.disconnected.store(!connected, Ordering::Relaxed);
        }
        Ok(())
    }
    /// Counters of the link between site `site` and site 0: (toward site 0, from site 0).
    pub fn site_link_counters(
        &self,
        site: usize,
    ) -> Option<(DirectionCountersSnapshot, DirectionCountersSnapshot)> {
        self.site_links
            .iter()
            .find(|(index, _)| *index == site)
            .map(|(_, pair)| {
                (
                    pair.handles[0].counters.snapshot(),
                    pair.handles[1].counters.snapshot(),
                )
            })
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
        let host = self.host(index)?;
        let state = if up { "up" } else { "down" };
        netns::ip_in(
            &self.switches[host.site],
            &["link", "set", "dev", &host.port, state],
        )
        .map(drop)
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
        for (_, forwarder) in self.forwarders.iter_mut().chain(self.site_links.iter_mut()) {
            forwarder.stop();
        }
        if let Err(error) = self.namespaces.delete_all() {
            tracing::warn!(%error, "region teardown incomplete");
        }
    }
}
