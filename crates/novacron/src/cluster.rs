//! `novacron cluster ...`: region commands. Init and join make the host's `serve` restart into
//! the region; the commands wait (with a deadline) until the host answers again in its new role.

use crate::cli::{
    AntiAffinityArg, ClusterCommand, OutputFormat, PolicyCommand, StrategyArg, TokenCommand,
};
use crate::client::{CliError, CliResult, Client};
use crate::output;
use novacron_types::{
    ByteSize, ClusterHost, ClusterInfo, ClusterInitRequest, ClusterJoinRequest,
    ClusterMembershipChange, CreateJoinTokenRequest, ErrorCode, JoinTokenInfo, PlacementPolicy,
    VmRecord,
};
use reqwest::Method;
use std::time::{Duration, Instant};

pub async fn run(client: &Client, format: OutputFormat, command: ClusterCommand) -> CliResult<()> {
    match command {
        ClusterCommand::Init { name, addresses } => {
            let request = ClusterInitRequest {
                name,
                raft_listen: addresses.raft_listen,
                advertise: addresses.advertise,
            };
            let change: ClusterMembershipChange = client
                .json(
                    client
                        .request(Method::POST, "/api/v1/cluster/init")
                        .json(&request),
                )
                .await?;
            let info = wait_for_member(client, change.node_id, Duration::from_secs(60)).await?;
            output::emit(format, &info, |info| {
                println!(
                    "region {} created; this host is node {} with its cluster listener at {}",
                    info.region.as_deref().unwrap_or("-"),
                    change.node_id,
                    change.raft_address
                );
                println!(
                    "next: `novacron cluster token create` here, then on a new host `novacron cluster join {} --join-token TOKEN`",
                    change.raft_address
                );
            });
        }
        ClusterCommand::Policy(command) => policy(client, format, command).await?,
        ClusterCommand::Token(TokenCommand::Create { ttl }) => {
            let ttl = parse_duration(&ttl)?;
            let token: JoinTokenInfo = client
                .json(client.request(Method::POST, "/api/v1/cluster/tokens").json(
                    &CreateJoinTokenRequest {
                        ttl_secs: Some(ttl.as_secs()),
                    },
                ))
                .await?;
            output::emit(format, &token, |token| {
                println!("{}", token.token);
                eprintln!(
                    "one-time token, valid for {}; on the new host: novacron cluster join {} --join-token <token>",
                    humanize(ttl),
                    token.join_address
                );
            });
        }
        ClusterCommand::Join {
            address,
            join_token,
            addresses,
            wait_timeout,
        } => {
            let request = ClusterJoinRequest {
                address,
                token: join_token,
                raft_listen: addresses.raft_listen,
                advertise: addresses.advertise,
            };
            let change: ClusterMembershipChange = client
                .json(
                    client
                        .request(Method::POST, "/api/v1/cluster/join")
                        .json(&request),
                )
                .await?;
            let info =
                wait_for_member(client, change.node_id, Duration::from_secs(wait_timeout)).await?;
            output::emit(format, &info, |info| {
                let role = info
                    .hosts
                    .iter()
                    .find(|host| host.node_id == change.node_id)
                    .map(|host| host.role.clone())
                    .unwrap_or_default();
                println!(
                    "joined region {} as node {} ({role}); cluster listener at {}",
                    info.region.as_deref().unwrap_or("-"),
                    change.node_id,
                    change.raft_address
                );
            });
        }
        ClusterCommand::List => {
            let info: ClusterInfo = client.get("/api/v1/cluster").await?;
            output::emit(format, &info, print_hosts);
        }
        ClusterCommand::Remove {
            host,
            force,
            abandon_vms,
        } => {
            if force {
                evacuate(client, &host).await?;
            }
            let removed: ClusterHost = client
                .json(client.request(
                    Method::DELETE,
                    &format!(
                        "/api/v1/cluster/hosts/{}?force={abandon_vms}",
                        crate::image::url_encode(&host)
                    ),
                ))
                .await?;
            output::emit(format, &removed, |removed| {
                println!(
                    "removed host {} (node {}) from the region",
                    removed.host, removed.node_id
                );
            });
        }
    }
    Ok(())
}

/// Moves every VM assigned to `host` (a name or node id) to other hosts, one at a time, each
/// with its progress bar. The first VM that cannot move stops it with an error naming it; VMs
/// already moved stay moved and the host stays in the region.
async fn evacuate(client: &Client, host: &str) -> CliResult<()> {
    let info: ClusterInfo = client.get("/api/v1/cluster").await?;
    let Some(member) = info
        .hosts
        .iter()
        .find(|member| member.host == host || member.node_id.to_string() == host)
    else {
        return Err(CliError::new(
            ErrorCode::NotFound,
            format!("host {host:?} is not in the region; `novacron cluster list` shows the hosts"),
        ));
    };
    let vms: Vec<VmRecord> = client.get("/api/v1/vms").await?;
    let assigned: Vec<&VmRecord> = vms
        .iter()
        .filter(|vm| vm.status.host == member.host)
        .collect();
    if assigned.is_empty() {
        return Ok(());
    }
    eprintln!(
        "evacuating {} vm(s) from host {}: {}",
        assigned.len(),
        member.host,
        assigned
            .iter()
            .map(|vm| vm.spec.name.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for vm in assigned {
        let name = vm.spec.name.to_string();
        match crate::migration::evacuate(client, &name).await {
            Ok(record) => eprintln!("moved vm {name} to {}", record.destination),
            Err(error) => {
                return Err(CliError::new(
                    error.code,
                    format!(
                        "vm {name} could not be moved off host {}: {}; the host stays in the \
                         region (VMs moved so far stay moved). Move or delete it and try again, \
                         or pass --abandon-vms to remove the host anyway",
                        member.host, error.message
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Waits until the restarted host answers and lists itself as a member (voter, learner or
/// leader).
async fn wait_for_member(
    client: &Client,
    node_id: u64,
    timeout: Duration,
) -> CliResult<ClusterInfo> {
    let deadline = Instant::now() + timeout;
    let mut last_problem;
    // The host answers the request, then restarts: let it go down first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    loop {
        match client.get::<ClusterInfo>("/api/v1/cluster").await {
            Ok(info) if info.node_id == node_id => {
                let member = info.hosts.iter().any(|host| {
                    host.node_id == node_id
                        && matches!(host.role.as_str(), "leader" | "voter" | "learner")
                });
                if member {
                    return Ok(info);
                }
                last_problem = format!("node {node_id} is not a member yet");
            }
            Ok(_) => last_problem = "the host has not restarted into the region yet".into(),
            Err(error) => last_problem = error.message,
        }
        if Instant::now() >= deadline {
            return Err(CliError::new(
                ErrorCode::Unavailable,
                format!(
                    "the host did not become a member of the region within {}s ({last_problem}); \
                     its `serve` log says why, `novacron cluster list` shows the state",
                    timeout.as_secs()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn print_hosts(info: &ClusterInfo) {
    match &info.region {
        Some(region) => println!(
            "region {region}, this host is node {}, leader {}",
            info.node_id,
            info.leader_id
                .map(|id| format!("node {id}"))
                .unwrap_or_else(|| "unknown".into())
        ),
        None => println!(
            "not in a region (one-host cluster); `novacron cluster init` makes this host the first host of one"
        ),
    }
    if info.membership_changing {
        println!(
            "the voters are changing (joint consensus): until it completes, a majority of both \
             the old and the new voters must stay up"
        );
    }
    let rows: Vec<Vec<String>> = info
        .hosts
        .iter()
        .map(|host| {
            let heartbeat = host.heartbeat.as_ref();
            vec![
                host.node_id.to_string(),
                host.host.clone(),
                host.role.clone(),
                host.raft_address.clone(),
                match host.heartbeat_age_secs {
                    Some(age) => format!("{} ({age}s ago)", host.health),
                    None => host.health.clone(),
                },
                heartbeat
                    .map(|heartbeat| heartbeat.cpus.to_string())
                    .unwrap_or_else(|| "-".into()),
                heartbeat
                    .map(|heartbeat| {
                        format!(
                            "{} / {}",
                            ByteSize(heartbeat.memory_available_bytes),
                            ByteSize(heartbeat.memory_bytes)
                        )
                    })
                    .unwrap_or_else(|| "-".into()),
                heartbeat
                    .map(|heartbeat| {
                        format!("{} ({} running)", heartbeat.vms, heartbeat.vms_running)
                    })
                    .unwrap_or_else(|| "-".into()),
                heartbeat
                    .map(|heartbeat| output::labels(&heartbeat.labels))
                    .unwrap_or_else(|| "-".into()),
                heartbeat
                    .filter(|heartbeat| !heartbeat.shared_storages.is_empty())
                    .map(|heartbeat| heartbeat.shared_storages.join(","))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "HOST",
            "ROLE",
            "RAFT ADDRESS",
            "HEALTH",
            "CPUS",
            "MEMORY FREE",
            "VMS",
            "LABELS",
            "SHARED STORAGE",
        ],
        &rows,
    );
}

/// `30m`, `1h`, `2d`, `90s` or plain seconds.
fn parse_duration(text: &str) -> CliResult<Duration> {
    let invalid = || {
        CliError::new(
            ErrorCode::InvalidArgument,
            format!("--ttl {text:?} is not a duration like 90s, 30m, 1h or 2d"),
        )
    };
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(index) => text.split_at(index),
        None => (text, "s"),
    };
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit {
        "s" => number,
        "m" => number.checked_mul(60).ok_or_else(invalid)?,
        "h" => number.checked_mul(3600).ok_or_else(invalid)?,
        "d" => number.checked_mul(86_400).ok_or_else(invalid)?,
        _ => return Err(invalid()),
    };
    Ok(Duration::from_secs(seconds))
}

fn humanize(duration: Duration) -> String {
    let seconds = duration.as_secs();
    match seconds {
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

const POLICY_PATH: &str = "/api/v1/cluster/placement-policy";

/// `cluster policy show|set|reset`.
async fn policy(client: &Client, format: OutputFormat, command: PolicyCommand) -> CliResult<()> {
    use novacron_types::{AntiAffinity, PlacementStrategy};
    let policy = match command {
        PolicyCommand::Show => client.get(POLICY_PATH).await?,
        PolicyCommand::Reset => put_policy(client, &PlacementPolicy::default()).await?,
        PolicyCommand::Set(args) => {
            let mut policy: PlacementPolicy = client.get(POLICY_PATH).await?;
            let unchanged = policy.clone();
            if let Some(strategy) = args.strategy {
                policy.strategy = match strategy {
                    StrategyArg::Spread => PlacementStrategy::Spread,
                    StrategyArg::BinPack => PlacementStrategy::BinPack,
                };
            }
            if let Some(mode) = args.anti_affinity {
                policy.anti_affinity = match mode {
                    AntiAffinityArg::Hard => AntiAffinity::Hard,
                    AntiAffinityArg::Soft => AntiAffinity::Soft,
                };
            }
            for (value, field) in [
                (args.cpu_overcommit, &mut policy.cpu_overcommit),
                (args.memory_overcommit, &mut policy.memory_overcommit),
                (args.anti_affinity_weight, &mut policy.anti_affinity_weight),
                (
                    args.image_locality_weight,
                    &mut policy.image_locality_weight,
                ),
            ] {
                if let Some(value) = value {
                    *field = value;
                }
            }
            if policy == unchanged {
                return Err(CliError::new(
                    ErrorCode::InvalidArgument,
                    "nothing to change: give at least one setting (`novacron cluster policy set \
                     --help` lists them)",
                ));
            }
            put_policy(client, &policy).await?
        }
    };
    output::emit(format, &policy, print_policy);
    Ok(())
}

async fn put_policy(client: &Client, policy: &PlacementPolicy) -> CliResult<PlacementPolicy> {
    client
        .json(client.request(Method::PUT, POLICY_PATH).json(policy))
        .await
}

fn print_policy(policy: &PlacementPolicy) {
    let mode = |text: String| text.to_lowercase().replace("binpack", "bin-pack");
    output::details(&[
        ("strategy", mode(format!("{:?}", policy.strategy))),
        ("cpu overcommit", policy.cpu_overcommit.to_string()),
        ("memory overcommit", policy.memory_overcommit.to_string()),
        ("anti-affinity", mode(format!("{:?}", policy.anti_affinity))),
        (
            "anti-affinity weight",
            policy.anti_affinity_weight.to_string(),
        ),
        (
            "image locality weight",
            policy.image_locality_weight.to_string(),
        ),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert_eq!(humanize(Duration::from_secs(3600)), "1h");
    }
}
