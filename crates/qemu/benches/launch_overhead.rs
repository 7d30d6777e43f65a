//! Driver overhead on the way to a booted guest: time from "start" to the guest's
//! `NOVACRON-GUEST-READY` serial line, through `QemuVm::launch` versus a bare `qemu-system-x86_64`
//! command line with the same machine, kernel, initrd and disk, in the same run, alternating.
//!
//! Run: `cargo bench -p novacron-qemu --bench launch_overhead` (after `scripts/build-guest`).
//! `NOVACRON_BENCH_ITERATIONS` (default 5) sets the number of boots of each kind.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use novacron_qemu::{
    Accelerator, DirectKernelBoot, ImageFormat, LaunchSpec, QemuBinaries, QemuImg, QemuVm,
    TestGuest, probe_accelerator,
};

const READY_LINE: &str = novacron_qemu::test_guest::READY_LINE;
const CMDLINE: &str = novacron_qemu::test_guest::DEFAULT_CMDLINE;
const DEADLINE: Duration = Duration::from_secs(120);

/// Polls `log` every millisecond until the ready line appears; returns the time since `start`.
async fn time_to_ready(log: &Path, start: Instant) -> Result<Duration, String> {
    loop {
        if std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains(READY_LINE)
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > DEADLINE {
            return Err(format!(
                "no ready line in {} within {DEADLINE:?}",
                log.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn bare_boot(
    binaries: &QemuBinaries,
    accelerator: Accelerator,
    guest: &Path,
    run_dir: &Path,
) -> Result<Duration, String> {
    let qemu_img = QemuImg::new(binaries);
    let overlay = run_dir.join("bare.qcow2");
    qemu_img
        .create_overlay(
            &guest.join("disk.qcow2"),
            ImageFormat::Qcow2,
            &overlay,
            None,
        )
        .await
        .map_err(|error| error.to_string())?;
    let serial = run_dir.join("bare-serial.log");
    let start = Instant::now();
    let mut child = tokio::process::Command::new(&binaries.system)
        .args([
            "-machine",
            "q35",
            "-accel",
            accelerator.qemu_name(),
            "-cpu",
            accelerator.cpu_model(),
        ])
        .args([
            "-m",
            "256M",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.img"))
        .args(["-append", CMDLINE])
        .arg("-drive")
        .arg(format!("file={},if=virtio,format=qcow2", overlay.display()))
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| error.to_string())?;
    let elapsed = time_to_ready(&serial, start).await;
    let _ = child.kill().await;
    elapsed
}

async fn driver_boot(
    binaries: &QemuBinaries,
    accelerator: Accelerator,
    guest: &Path,
    run_dir: &Path,
    include_overlay: bool,
) -> Result<Duration, String> {
    let qemu_img = QemuImg::new(binaries);
    let overlay = run_dir.join("disk.qcow2");
    let overlay_start = Instant::now();
    qemu_img
        .create_overlay(
            &guest.join("disk.qcow2"),
            ImageFormat::Qcow2,
            &overlay,
            None,
        )
        .await
        .map_err(|error| error.to_string())?;
    let start = if include_overlay {
        overlay_start
    } else {
        Instant::now()
    };
    let spec = LaunchSpec::new("bench", uuid::Uuid::new_v4(), run_dir)
        .accelerator(accelerator)
        .disk(&overlay, ImageFormat::Qcow2)
        .kernel(DirectKernelBoot {
            kernel: guest.join("vmlinuz"),
            initrd: Some(guest.join("initrd.img")),
            cmdline: Some(CMDLINE.to_owned()),
        });
    let vm = QemuVm::launch(binaries, &spec)
        .await
        .map_err(|error| error.to_string())?;
    let elapsed = time_to_ready(&vm.run_directory().console_log(), start).await;
    let _ = vm.force_stop().await;
    elapsed
}

fn summary(samples: &mut [Duration]) -> (Duration, Duration, Duration) {
    samples.sort();
    let median = samples[samples.len() / 2];
    (samples[0], median, samples[samples.len() - 1])
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.0}", duration.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let iterations: usize = std::env::var("NOVACRON_BENCH_ITERATIONS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(5);
    let guest = TestGuest::locate()
        .map_err(|error| error.to_string())?
        .directory;
    let binaries = QemuBinaries::locate().map_err(|error| error.to_string())?;
    let probe = probe_accelerator(&binaries).await;
    eprintln!("accelerator: {} ({})", probe.accelerator, probe.reason);

    let mut bare = Vec::new();
    let mut driver = Vec::new();
    let mut driver_with_overlay = Vec::new();
    for iteration in 0..iterations {
        // Rotate the order every iteration so no kind always follows the same other kind.
        for offset in 0..3 {
            let kind = (iteration + offset) % 3;
            let run_dir = tempfile::Builder::new()
                .prefix("ncq-bench-")
                .tempdir_in("/tmp")
                .map_err(|error| error.to_string())?;
            let result = match kind {
                0 => bare_boot(&binaries, probe.accelerator, &guest, run_dir.path())
                    .await
                    .map(|elapsed| bare.push(elapsed)),
                1 => driver_boot(&binaries, probe.accelerator, &guest, run_dir.path(), false)
                    .await
                    .map(|elapsed| driver.push(elapsed)),
                _ => driver_boot(&binaries, probe.accelerator, &guest, run_dir.path(), true)
                    .await
                    .map(|elapsed| driver_with_overlay.push(elapsed)),
            };
            result.map_err(|error| format!("iteration {iteration}: {error}"))?;
        }
    }

    let (bare_min, bare_median, bare_max) = summary(&mut bare);
    println!(
        "\n### time from start to `{READY_LINE}` ({} guest, 256 MiB, {iterations} boots each)\n",
        probe.accelerator
    );
    println!("| launch path | min ms | median ms | max ms | median overhead vs bare ms |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| bare `qemu-system-x86_64` (baseline) | {} | {} | {} | 0 |",
        milliseconds(bare_min),
        milliseconds(bare_median),
        milliseconds(bare_max)
    );
    for (label, samples) in [
        (
            "`QemuVm::launch` (setsid, QMP handshake, console socket + log)",
            &mut driver,
        ),
        (
            "`qemu-img` overlay + `QemuVm::launch`",
            &mut driver_with_overlay,
        ),
    ] {
        let (min, median, max) = summary(samples);
        let overhead = median.as_secs_f64() * 1000.0 - bare_median.as_secs_f64() * 1000.0;
        println!(
            "| {label} | {} | {} | {} | {overhead:+.0} |",
            milliseconds(min),
            milliseconds(median),
            milliseconds(max)
        );
    }
    Ok(())
}
