//! Faults: `serve` killed and restarted with VMs running, QEMU killed under it, a crash in the
//! middle of `vm create`.

mod common;

use common::{TestHost, poll, process_alive};
use std::time::Duration;

#[test]
fn running_vms_survive_a_kill_9_of_serve_and_are_reattached() {
    let mut host = TestHost::start();
    host.import_guest_image("img");
    let created = host.create_guest_vm("keep", "img", &[]);
    let pid = created["status"]["pid"].as_u64().expect("pid");
    host.wait_for_console("keep", "NOVACRON-GUEST-READY");

    host.kill_serve();
    assert!(
        process_alive(pid),
        "qemu is not a child of serve and keeps running"
    );
    host.spawn_serve();

    let vm = host.vm("keep");
    assert_eq!(vm["status"]["state"], "running");
    assert_eq!(
        vm["status"]["pid"].as_u64(),
        Some(pid),
        "same qemu, re-attached"
    );
    // Re-attached for real: QMP control works through the new serve.
    assert_eq!(
        host.json(&["vm", "pause", "keep"])["status"]["state"],
        "paused"
    );
    assert_eq!(
        host.json(&["vm", "resume", "keep"])["status"]["state"],
        "running"
    );
    host.ok(&["vm", "stop", "keep", "--force"]);
    assert!(!process_alive(pid));
}

#[test]
fn qemu_killed_turns_the_vm_failed_with_the_reason_and_the_policy_restarts_it() {
    let host = TestHost::start();
    host.import_guest_image("img");
    let plain = host.create_guest_vm("plain", "img", &[]);
    let healing = host.create_guest_vm("healing", "img", &["--restart", "on-failure"]);

    host.wait_for_console("plain", "NOVACRON-GUEST-READY");
    let plain_pid = plain["status"]["pid"].as_u64().expect("pid");
    std::process::Command::new("kill")
        .args(["-9", &plain_pid.to_string()])
        .status()
        .expect("kill");
    let failed = host.wait_for_state("plain", "failed");
    let reason = failed["status"]["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("SIGKILL") || reason.contains("killed"),
        "reason names the kill: {reason}"
    );
    assert_eq!(failed["desired"], "stopped", "policy never: stays down");
    // The log is kept for a post-mortem.
    assert!(host.serial_log("plain").contains("NOVACRON-GUEST-READY"));

    let healing_pid = healing["status"]["pid"].as_u64().expect("pid");
    std::process::Command::new("kill")
        .args(["-9", &healing_pid.to_string()])
        .status()
        .expect("kill");
    let restarted = poll("healing to be restarted", Duration::from_secs(90), || {
        let vm = host.vm("healing");
        (vm["status"]["state"] == "running" && vm["status"]["pid"].as_u64() != Some(healing_pid))
            .then_some(vm)
    });
    assert_eq!(restarted["status"]["restarts"], 1);

    // A failed VM starts again on request.
    assert_eq!(
        host.json(&["vm", "start", "plain"])["status"]["state"],
        "running"
    );
}

#[test]
fn a_crash_in_the_middle_of_vm_create_is_finished_after_restart() {
    let mut host = TestHost::new();
    host.spawn_serve();
    host.import_guest_image("img");
    host.kill_serve();
    // This serve aborts right after writing the VM record, before the disk exists.
    host.extra_env = vec![("NOVACRON_FAILPOINT".into(), "create-after-record".into())];
    host.spawn_serve();
    let arguments = TestHost::guest_vm_arguments("halfway", "img");
    let output = host.cli(&arguments.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        !output.status.success(),
        "the create was cut off by the crash"
    );
    poll(
        "serve to die at the failpoint",
        Duration::from_secs(30),
        || {
            host.serve
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
        },
    );
    host.serve = None;
    host.extra_env.clear();
    host.spawn_serve();
    // The restarted host finishes the create: disk made, VM started, exactly one QEMU.
    let vm = host.wait_for_state("halfway", "running");
    let uuid = vm["uuid"].as_str().expect("uuid");
    assert!(host.vm_directory(uuid).join("disk.qcow2").exists());
    host.wait_for_console("halfway", "NOVACRON-GUEST-READY");
    let vms = host.json(&["vm", "list"]);
    assert_eq!(vms.as_array().map(Vec::len), Some(1));
    let qemus = std::process::Command::new("pgrep")
        .args(["-f", "--", &format!("-uuid {uuid}")])
        .output()
        .expect("pgrep");
    assert_eq!(
        String::from_utf8_lossy(&qemus.stdout).lines().count(),
        1,
        "exactly one qemu for the vm"
    );
}
