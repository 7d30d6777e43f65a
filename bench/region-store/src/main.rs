//! Issue 4's store benchmark: durable writes per second and their latency on a 3-voter NovaCron
//! region store, against a 3-member etcd (Debian's etcd-server), on this machine in the same run.
//!
//! Both sides keep their data in directories under one parent on the same disk, both fsync every
//! acknowledged write, both have three voters talking over loopback TCP. The NovaCron side is the
//! real region stack: three `Store`s (openraft + redb), each with its own mTLS raft listener
//! (`novacron-cluster`), in this process; writers call `ClusterStore::put` on the leader. The
//! etcd side is three `etcd` processes; writers send `KV.Put` over gRPC to the leader's client
//! port (16 HTTP/2 connections at most, shared round-robin). So etcd's figures include a loopback
//! gRPC hop per write that NovaCron's do not; the table prints etcd's hop cost alone (a
//! serializable `Range` of one key through the same client) so the reader can see its size.
//!
//! Each write is a ~330-byte VM record under a fresh key. Scenarios are interleaved (NovaCron,
//! etcd, NovaCron, ...) and repeated in rounds, so drift of the machine's load hits both.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use novacron_cluster::{ClusterCa, ClusterStore, MtlsRaftOptions, MtlsRaftTransport, RaftListener};
use novacron_store::{Bootstrap, NodeRole, Store, StoreConfig};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;

fn vm_record(index: usize) -> Vec<u8> {
    format!(
        r#"{{"name":"vm-{index:06}","image":"blake3:{:064x}","cpus":2,"memory_bytes":536870912,"disk_bytes":2147483648,"state":"running","host":"host-1","restart_policy":"always","labels":{{"team":"web","tier":"frontend"}}}}"#,
        index
    )
    .into_bytes()
}

struct Options {
    duration: Duration,
    writers: Vec<usize>,
    rounds: usize,
    root: PathBuf,
}

impl Options {
    fn from_env() -> anyhow::Result<Options> {
        let seconds: f64 = std::env::var("REGION_BENCH_SECONDS")
            .unwrap_or_else(|_| "5".into())
            .parse()
            .context("REGION_BENCH_SECONDS must be a number of seconds")?;
        let writers = std::env::var("REGION_BENCH_WRITERS")
            .unwrap_or_else(|_| "1,256".into())
            .split(',')
            .map(|count| count.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .context("REGION_BENCH_WRITERS must be comma-separated counts, e.g. 1,256")?;
        let rounds = std::env::var("REGION_BENCH_ROUNDS")
            .unwrap_or_else(|_| "2".into())
            .parse()
            .context("REGION_BENCH_ROUNDS must be a count")?;
        let root = std::env::var_os("REGION_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        Ok(Options {
            duration: Duration::from_secs_f64(seconds),
            writers,
            rounds,
            root,
        })
    }
}

struct Figures {
    operations: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Figures {
    fn merge(parts: Vec<Vec<Duration>>, elapsed: Duration) -> Figures {
        let mut latencies: Vec<Duration> = parts.into_iter().flatten().collect();
        latencies.sort_unstable();
        Figures {
            operations: latencies.len(),
            elapsed,
            latencies,
        }
    }

    fn rate(&self) -> f64 {
        self.operations as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, fraction: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let index = ((self.latencies.len() as f64 - 1.0) * fraction).round() as usize;
        self.latencies[index].as_secs_f64() * 1e3
    }
}

// ----- NovaCron: three region stores over mTLS -----

struct NovaRegion {
    stores: Vec<Store>,
    servers: Vec<RaftServerHandle>,
    leader: ClusterStore,
    leader_transport: MtlsRaftTransport,
}

/// What the region keeps running besides the stores.
type RaftServerHandle = novacron_cluster::RaftServer;

impl NovaRegion {
    async fn start(dir: &Path) -> anyhow::Result<NovaRegion> {
        let ca = ClusterCa::generate("bench-region")?;
        let mut stores = Vec::new();
        let mut servers = Vec::new();
        let mut clusters = Vec::new();
        let mut transports = Vec::new();
        let mut addresses = Vec::new();
        for node_id in 1..=3u64 {
            let identity = ca.issue_node_identity(node_id)?;
            let transport = MtlsRaftTransport::new(&identity, MtlsRaftOptions::default())?;
            let listener = RaftListener::bind("127.0.0.1:0", &identity).await?;
            let address = listener.local_address().to_string();
            let mut config = StoreConfig::new(
                dir.join(format!("node-{node_id}")),
                node_id,
                address.clone(),
            );
            config.transport = Some(Arc::new(transport.clone()));
            config.bootstrap = if node_id == 1 {
                Bootstrap::SingleNode
            } else {
                Bootstrap::JoinExisting
            };
            let store = Store::open(config).await?;
            servers.push(listener.serve(store.clone()));
            clusters.push(ClusterStore::new(store.clone(), transport.clone()));
            transports.push(transport);
            stores.push(store);
            addresses.push(address);
        }
        let first = stores[0].clone();
        wait_for("node 1 to lead", || {
            first.metrics().role == NodeRole::Leader
        })
        .await?;
        for node_id in [2u64, 3] {
            first
                .add_learner(node_id, addresses[node_id as usize - 1].clone())
                .await?;
        }
        first.change_membership(BTreeSet::from([1, 2, 3])).await?;
        let leader = clusters[0].clone();
        Ok(NovaRegion {
            stores,
            servers,
            leader,
            leader_transport: transports[0].clone(),
        })
    }

    async fn writes(
        &self,
        writers: usize,
        duration: Duration,
        tag: &str,
    ) -> anyhow::Result<Figures> {
        let tag = tag.to_string();
        let cluster = self.leader.clone();
        closed_loop(writers, duration, move |writer, index| {
            let (cluster, key) = (cluster.clone(), format!("vms/{tag}-w{writer}-{index}"));
            async move {
                cluster.put(key, vm_record(index)).await?;
                Ok(())
            }
        })
        .await
    }

    /// Median and p99 of the leader's append-entries round trips (mTLS, loopback) so far.
    fn append_round_trips_ms(&self) -> (f64, f64) {
        let mut samples = self.leader_transport.round_trip_samples(&[2, 3]);
        samples.sort_unstable();
        let at = |fraction: f64| {
            samples
                .get(((samples.len() as f64 - 1.0) * fraction).round() as usize)
                .map_or(f64::NAN, |sample| sample.as_secs_f64() * 1e3)
        };
        (at(0.5), at(0.99))
    }

    async fn stop(self) {
        for store in &self.stores {
            let _ = store.shutdown().await;
        }
        for server in self.servers {
            server.shutdown().await;
        }
    }
}

// ----- etcd: three processes, gRPC KV.Put to the leader -----

#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// etcd's answers are decoded only far enough to know they succeeded.
#[derive(Clone, PartialEq, prost::Message)]
struct IgnoredResponse {}

#[derive(Clone, PartialEq, prost::Message)]
struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bool, tag = "7")]
    serializable: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHeader {
    #[prost(uint64, tag = "2")]
    member_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(uint64, tag = "4")]
    leader: u64,
}

async fn unary<Request, Response>(
    channel: Channel,
    path: &'static str,
    request: Request,
) -> anyhow::Result<Response>
where
    Request: prost::Message + Send + Sync + 'static,
    Response: prost::Message + Default + Send + Sync + 'static,
{
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await?;
    let codec = tonic::codec::ProstCodec::<Request, Response>::default();
    let response = client
        .unary(
            tonic::Request::new(request),
            PathAndQuery::from_static(path),
            codec,
        )
        .await?;
    Ok(response.into_inner())
}

struct EtcdCluster {
    members: Vec<Child>,
    client_addresses: Vec<String>,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.kill();
            let _ = member.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl EtcdCluster {
    fn start(dir: &Path) -> anyhow::Result<EtcdCluster> {
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let initial_cluster = ports
            .iter()
            .enumerate()
            .map(|(index, (_, peer))| format!("e{index}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            client_addresses: Vec::new(),
        };
        for (index, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("e{index}.log")))?;
            let member = Command::new("etcd")
                .args(["--name", &format!("e{index}")])
                .arg("--data-dir")
                .arg(dir.join(format!("e{index}")))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "novacron-bench"])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("start etcd (install Debian's etcd-server)")?;
            cluster.members.push(member);
            cluster
                .client_addresses
                .push(format!("http://127.0.0.1:{client}"));
        }
        Ok(cluster)
    }

    /// The client address of the member that leads, once all three agree on one.
    async fn leader_address(&self) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut statuses = Vec::new();
            for address in &self.client_addresses {
                let status = async {
                    let channel = Channel::from_shared(address.clone())?.connect().await?;
                    unary::<StatusRequest, StatusResponse>(
                        channel,
                        "/etcdserverpb.Maintenance/Status",
                        StatusRequest {},
                    )
                    .await
                }
                .await;
                statuses.push(status.ok());
            }
            if let Some(leader) = statuses.iter().flatten().map(|status| status.leader).next() {
                let agreed = statuses.iter().all(|status| {
                    status
                        .as_ref()
                        .is_some_and(|status| status.leader == leader)
                });
                let leading = statuses
                    .iter()
                    .zip(&self.client_addresses)
                    .find(|(status, _)| {
                        status
                            .as_ref()
                            .and_then(|status| status.header.as_ref())
                            .is_some_and(|header| header.member_id == leader)
                    });
                if let (true, Some((_, address))) = (agreed && leader != 0, leading) {
                    return Ok(address.clone());
                }
            }
            if Instant::now() > deadline {
                bail!("etcd did not elect a leader within 60 s (logs in its data directory)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn connections(address: &str, count: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::new();
    for _ in 0..count {
        channels.push(Channel::from_shared(address.to_string())?.connect().await?);
    }
    Ok(channels)
}

async fn etcd_requests(
    address: &str,
    writers: usize,
    duration: Duration,
    tag: &str,
    write: bool,
) -> anyhow::Result<Figures> {
    let channels = connections(address, writers.clamp(1, 16)).await?;
    let tag = tag.to_string();
    closed_loop(writers, duration, move |writer, index| {
        let channel = channels[writer % channels.len()].clone();
        let key = format!("vms/{tag}-w{writer}-{index}").into_bytes();
        async move {
            if write {
                let request = PutRequest {
                    key,
                    value: vm_record(index),
                };
                unary::<PutRequest, IgnoredResponse>(channel, "/etcdserverpb.KV/Put", request)
                    .await?;
            } else {
                let request = RangeRequest {
                    key: b"vms/warm-up".to_vec(),
                    serializable: true,
                };
                unary::<RangeRequest, IgnoredResponse>(channel, "/etcdserverpb.KV/Range", request)
                    .await?;
            }
            Ok(())
        }
    })
    .await
}

/// `writers` concurrent clients, each issuing `request(writer, index)` back to back until
/// `duration` has passed; every request's latency is kept.
async fn closed_loop<Request, Pending>(
    writers: usize,
    duration: Duration,
    request: Request,
) -> anyhow::Result<Figures>
where
    Request: Fn(usize, usize) -> Pending + Clone + Send + Sync + 'static,
    Pending: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut index = 0usize;
            while Instant::now() < deadline {
                let begun = Instant::now();
                request(writer, index).await?;
                latencies.push(begun.elapsed());
                index += 1;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut parts = Vec::new();
    for task in tasks {
        parts.push(task.await??);
    }
    Ok(Figures::merge(parts, started.elapsed()))
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn row(system: &str, writers: usize, round: usize, figures: &Figures) {
    println!(
        "| {system} | {writers} | {round} | {:.0} | {:.2} | {:.2} |",
        figures.rate(),
        figures.percentile_ms(0.5),
        figures.percentile_ms(0.99)
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = Options::from_env()?;
    let dir = tempfile::Builder::new()
        .prefix("novacron-region-bench-")
        .tempdir_in(&options.root)?;
    std::fs::create_dir_all(dir.path().join("novacron"))?;
    std::fs::create_dir_all(dir.path().join("etcd"))?;

    let region = NovaRegion::start(&dir.path().join("novacron")).await?;
    let etcd = EtcdCluster::start(&dir.path().join("etcd"))?;
    let etcd_leader = etcd.leader_address().await?;
    // Warm-up on both: the first fsyncs of new files are not counted.
    region
        .writes(1, Duration::from_millis(500), "warm-up")
        .await?;
    etcd_requests(&etcd_leader, 1, Duration::from_millis(500), "warm-up", true).await?;
    let hop = etcd_requests(&etcd_leader, 1, Duration::from_secs(1), "hop", false).await?;

    println!(
        "3 voters each, data under {} ({} s per scenario); etcd {}",
        dir.path().display(),
        options.duration.as_secs_f64(),
        etcd_version()
    );
    println!();
    println!("| system | writers | round | writes/s | p50 ms | p99 ms |");
    println!("|---|---:|---:|---:|---:|---:|");
    for round in 1..=options.rounds {
        for &writers in &options.writers {
            let tag = format!("r{round}-n{writers}");
            let novacron = region.writes(writers, options.duration, &tag).await?;
            row(
                "NovaCron region store (openraft + redb, mTLS)",
                writers,
                round,
                &novacron,
            );
            let baseline =
                etcd_requests(&etcd_leader, writers, options.duration, &tag, true).await?;
            row(
                "etcd 3.4 (gRPC KV.Put to the leader)",
                writers,
                round,
                &baseline,
            );
        }
    }
    println!();
    println!(
        "etcd's client hop alone (serializable Range of one key, 1 client): p50 {:.3} ms, p99 {:.3} ms",
        hop.percentile_ms(0.5),
        hop.percentile_ms(0.99)
    );
    let (round_trip_p50, round_trip_p99) = region.append_round_trips_ms();
    println!(
        "NovaCron leader's append-entries round trips (recent samples): p50 {round_trip_p50:.3} ms, p99 {round_trip_p99:.3} ms"
    );
    drop(etcd);
    region.stop().await;
    Ok(())
}

fn etcd_version() -> String {
    Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.lines().next().map(|line| line.trim().to_string()))
        .unwrap_or_else(|| "(version unknown)".into())
}
