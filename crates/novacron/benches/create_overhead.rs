//! `vm create` + start until the guest's serial line, against the same guest started by a bare
//! `qemu-system-x86_64` command line, interleaved in one run (target: overhead < 100 ms).
//!
//! The bare run executes exactly the QEMU command line NovaCron would use (from the QEMU crate's
//! `LaunchSpec`), as a plain child process, so the difference is NovaCron's own machinery: CLI,
//! API, store write, disk overlay, reconciler, detached launch and QMP handshake. Both boot the same
//! kernel, initrd and disk image (the bare run's overlay is made beforehand, NovaCron makes its own
//! inside the timed create), under TCG with 256 MiB, and both are timed to the first
//! `NOVACRON-GUEST-READY` in the console log file, polled every 2 ms.

#[path = "../tests/common/mod.rs"]
mod common;

use common::TestHost;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 7;
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

fn wait_for_ready(log: &Path, started: Instant) -> Duration {
    let deadline = started + Duration::from_secs(120);
    loop {
        if std::fs::read(log).is_ok_and(|bytes| {
            bytes
                .windows(b"NOVACRON-GUEST-READY".len())
                .any(|window| window == b"NOVACRON-GUEST-READY")
        }) {
            return started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "no ready line in {}",
            log.display()
        );
        std::thread::park_timeout(Duration::from_millis(2));
    }
}

fn bare_qemu(guest: &common::Guest, scratch: &Path, run: usize) -> Duration {
    let run_dir = scratch.join(format!("b{run}"));
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let overlay = run_dir.join("disk.qcow2");
    let status = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&guest.disk)
        .arg(&overlay)
        .status()
        .expect("qemu-img");
    assert!(status.success());
    let spec =
        novacron_qemu::LaunchSpec::new(format!("bare-{run}"), uuid::Uuid::new_v4(), &run_dir)
            .memory_mib(256)
            .disk(&overlay, novacron_qemu::ImageFormat::Qcow2)
            .kernel(novacron_qemu::DirectKernelBoot {
                kernel: guest.kernel.clone(),
                initrd: Some(guest.initrd.clone()),
                cmdline: Some(CMDLINE.into()),
            });
    let log = novacron_qemu::RunDirectory::new(&run_dir).console_log();
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(spec.qemu_arguments())
        .current_dir(&run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    let elapsed = wait_for_ready(&log, started);
    let _ = child.kill();
    let _ = child.wait();
    elapsed
}

fn novacron(host: &TestHost, guest: &common::Guest, run: usize) -> Duration {
    let name = format!("bench-{run}");
    let started = Instant::now();
    host.ok(&[
        "vm",
        "create",
        &name,
        "--image",
        "img",
        "--memory",
        "256MiB",
        "--no-wait",
        "--kernel",
        guest.kernel.to_str().expect("utf-8"),
        "--initrd",
        guest.initrd.to_str().expect("utf-8"),
        "--cmdline",
        CMDLINE,
    ]);
    let vm = host.vm(&name);
    let log = host
        .vm_directory(vm["uuid"].as_str().expect("uuid"))
        .join("console.log");
    let elapsed = wait_for_ready(&log, started);
    host.ok(&["vm", "delete", &name, "--force"]);
    elapsed
}

fn main() {
    let guest = common::guest();
    let host = TestHost::start();
    host.import_guest_image("img");
    let scratch = host.directory.path().to_path_buf();
    let mut bare = Vec::new();
    let mut ours = Vec::new();
    // One warm-up of each (page cache for kernel and initrd), then interleaved runs.
    bare_qemu(&guest, &scratch, 999);
    novacron(&host, &guest, 999);
    for run in 0..RUNS {
        bare.push(bare_qemu(&guest, &scratch, run));
        ours.push(novacron(&host, &guest, run));
    }
    bare.sort();
    ours.sort();
    let median = |samples: &[Duration]| samples[samples.len() / 2];
    let overhead = median(&ours).as_secs_f64() - median(&bare).as_secs_f64();
    println!(
        "## vm create + start to the guest's serial line ({RUNS} interleaved runs, TCG, 256 MiB)\n"
    );
    println!("| | min | median | max |");
    println!("|---|---|---|---|");
    let ms = |duration: Duration| duration.as_millis();
    println!(
        "| bare qemu-system-x86_64, the same command line | {} ms | {} ms | {} ms |",
        ms(bare[0]),
        ms(median(&bare)),
        ms(bare[RUNS - 1])
    );
    println!(
        "| novacron vm create (CLI → API → store → reconciler → QEMU) | {} ms | {} ms | {} ms |",
        ms(ours[0]),
        ms(median(&ours)),
        ms(ours[RUNS - 1])
    );
    println!(
        "\nNovaCron overhead (difference of medians): {:.0} ms (target < 100 ms)",
        overhead * 1000.0
    );
}
