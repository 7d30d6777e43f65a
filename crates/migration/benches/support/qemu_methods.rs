//! QEMU's own migration methods as the migration benches set them up (`migration_wan`, and
//! `novacron`'s `migrate_wan`), and the QMP events they time a pause by.

use novacron_qemu::{QemuVm, QmpEvent};
use serde_json::{Value, json};
use std::time::Duration;

/// QEMU's multifd channels for the multifd methods.
pub const MULTIFD_CHANNELS: usize = 4;

/// Capabilities and parameters of QEMU's multifd, 4 channels, zstd level 1.
pub fn multifd_zstd() -> (Value, Value) {
    (
        json!([{ "capability": "multifd", "state": true }]),
        json!({
            "multifd-channels": MULTIFD_CHANNELS,
            "multifd-compression": "zstd",
            "multifd-zstd-level": 1,
        }),
    )
}

/// Capabilities and parameters of QEMU's precopy with XBZRLE (a 256 MiB cache).
pub fn xbzrle() -> (Value, Value) {
    (
        json!([{ "capability": "xbzrle", "state": true }]),
        json!({ "xbzrle-cache-size": 256u64 << 20 }),
    )
}

/// Sets `capabilities` and `parameters` on both QEMUs of a migration.
pub async fn configure(
    vms: [&QemuVm; 2],
    capabilities: &Value,
    parameters: &Value,
) -> anyhow::Result<()> {
    for vm in vms {
        vm.qmp()
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": capabilities })),
            )
            .await?;
        vm.qmp()
            .execute("migrate-set-parameters", Some(parameters.clone()))
            .await?;
    }
    Ok(())
}

/// The first `name` event's QEMU timestamp (seconds since the epoch), waiting up to 5 s.
pub async fn first_event(
    events: &mut tokio::sync::broadcast::Receiver<QmpEvent>,
    name: &str,
) -> Option<f64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .ok()?
            .ok()?;
        if event.event == name {
            return Some(
                event.timestamp_seconds as f64 + event.timestamp_microseconds as f64 / 1e6,
            );
        }
    }
}

/// Polls the source QEMU's migration every 20 ms until it completes (its last `query-migrate`
/// answer); fails when it failed, was cancelled, or is not done after `deadline` from
/// `started`. `what` names the migration in errors.
pub async fn wait_for_completion(
    source: &QemuVm,
    what: &str,
    started: std::time::Instant,
    deadline: Duration,
) -> anyhow::Result<Value> {
    loop {
        let info = source.qmp().query_migrate().await?;
        match info["status"].as_str().unwrap_or_default() {
            "completed" => return Ok(info),
            "failed" | "cancelled" => anyhow::bail!("{what} failed: {info}"),
            _ => {}
        }
        if started.elapsed() > deadline {
            anyhow::bail!("{what} not done after {deadline:?}: {info}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
