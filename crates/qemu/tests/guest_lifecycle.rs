//! Boots the real test guest (scripts/build-guest) under QEMU and drives it: console line, pause
//! and resume, ACPI power-down, kill -9, re-attach after the client is dropped.

mod common;

use novacron_qemu::{QemuExitReason, QemuVm, QmpEventKind, RunState, VmError};

use novacron_qemu::test_guest::READY_LINE;

use common::{binaries, guest_spec, run_directory, wait_for_console, wait_for_process_gone};

/// Printed by busybox's shell on the console when it starts, after the ready line.
const SHELL_BANNER: &str = "Enter 'help' for a list of built-in commands.";

async fn next_event_of(
    events: &mut tokio::sync::broadcast::Receiver<novacron_qemu::QmpEvent>,
    kind: QmpEventKind,
) {
    let deadline = common::GUEST_DEADLINE;
    tokio::time::timeout(deadline, async {
        loop {
            let event = events.recv().await.expect("event stream");
            if event.kind() == kind {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {kind:?} event within {deadline:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_prints_ready_line_and_disk_size_on_the_serial_console() {
    let run_dir = run_directory();
    // The overlay is larger than the 64 MiB image: the guest must see the larger disk.
    let spec = guest_spec("boot", run_dir.path(), Some(128 * 1024 * 1024)).await;
    let vm = QemuVm::launch(&binaries(), &spec).await.expect("launch");
    let _cleanup = common::KillOnDrop::new(&vm);
    let console = vm.run_directory().console_log();
    let log = wait_for_console(&console, "NOVACRON-DISK vda").await;
    let ready = log
        .lines()
        .find(|line| line.starts_with(READY_LINE))
        .expect("ready line");
    let uptime: f64 = ready[READY_LINE.len()..]
        .trim()
        .parse()
        .expect("uptime after the ready line");
    assert!(uptime > 0.0, "{ready}");
    assert!(log.contains("NOVACRON-DISK vda 134217728"), "{log}");

    let status = vm.qmp().query_status().await.expect("query-status");
    assert_eq!(status.status, RunState::Running);
    let exit = vm.force_stop().await.expect("force stop");
    assert_eq!(
        exit.reason,
        QemuExitReason::HostShutdown {
            reason: "host-qmp-quit".into()
        }
    );
    assert!(exit.console_log_tail.contains(READY_LINE));
    assert!(
        !vm.run_directory().pid_file().exists(),
        "pid file removed after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_change_the_run_state_and_emit_events() {
    let run_dir = run_directory();
    let spec = guest_spec("pause", run_dir.path(), None).await;
    let vm = QemuVm::launch(&binaries(), &spec).await.expect("launch");
    let _cleanup = common::KillOnDrop::new(&vm);
    wait_for_console(&vm.run_directory().console_log(), READY_LINE).await;
    let mut events = vm.subscribe_events();

    vm.qmp().stop().await.expect("stop");
    next_event_of(&mut events, QmpEventKind::Stop).await;
    let status = vm.qmp().query_status().await.expect("query-status");
    assert_eq!((status.status, status.running), (RunState::Paused, false));

    vm.qmp().cont().await.expect("cont");
    next_event_of(&mut events, QmpEventKind::Resume).await;
    let status = vm.qmp().query_status().await.expect("query-status");
    assert_eq!((status.status, status.running), (RunState::Running, true));

    // The raw-JSON path works for commands without a helper.
    let name = vm
        .qmp()
        .execute("query-name", None)
        .await
        .expect("query-name");
    assert_eq!(name["name"], "pause");
    vm.force_stop().await.expect("force stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acpi_power_down_ends_qemu_with_a_guest_shutdown() {
    let run_dir = run_directory();
    let spec = guest_spec("powerdown", run_dir.path(), None).await;
    let vm = QemuVm::launch(&binaries(), &spec).await.expect("launch");
    let _cleanup = common::KillOnDrop::new(&vm);
    wait_for_console(&vm.run_directory().console_log(), READY_LINE).await;
    let pid = vm.pid();

    let exit = vm.stop(common::GUEST_DEADLINE).await.expect("stop");
    assert_eq!(
        exit.reason,
        QemuExitReason::GuestShutdown {
            reason: "guest-shutdown".into()
        },
        "{exit}"
    );
    assert!(exit.is_orderly());
    assert!(
        exit.console_log_tail.contains("NOVACRON-GUEST-POWERDOWN"),
        "{}",
        exit.console_log_tail
    );
    wait_for_process_gone(pid).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_is_reported_as_killed() {
    let run_dir = run_directory();
    let spec = guest_spec("killed", run_dir.path(), None).await;
    let vm = QemuVm::launch(&binaries(), &spec).await.expect("launch");
    let _cleanup = common::KillOnDrop::new(&vm);
    let status = std::process::Command::new("kill")
        .args(["-9", &vm.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(common::GUEST_DEADLINE, vm.wait_for_exit())
        .await
        .expect("exit reported");
    assert_eq!(exit.reason, QemuExitReason::Killed { signal: 9 });
    assert!(!exit.is_orderly());
    assert!(exit.to_string().contains("SIGKILL"), "{exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_after_dropping_the_client_finds_the_running_vm() {
    let run_dir = run_directory();
    let spec = guest_spec("reattach", run_dir.path(), None).await;
    let uuid = spec.uuid;
    let vm = QemuVm::launch(&binaries(), &spec).await.expect("launch");
    let _cleanup = common::KillOnDrop::new(&vm);
    wait_for_console(&vm.run_directory().console_log(), READY_LINE).await;
    let pid = vm.pid();
    // Simulates a restart of `novacron serve`: the handle and its QMP connection go away.
    drop(vm);

    // Another VM's uuid does not match this QEMU.
    assert!(
        QemuVm::attach(run_dir.path(), uuid::Uuid::new_v4())
            .await
            .expect("attach")
            .is_none()
    );

    let vm = QemuVm::attach(run_dir.path(), uuid)
        .await
        .expect("attach")
        .expect("qemu still running");
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.name(), "reattach");
    let status = vm.qmp().query_status().await.expect("query-status");
    assert_eq!(status.status, RunState::Running);

    // Launching again into the same run directory is refused while it runs.
    let again = QemuVm::launch(&binaries(), &spec).await.unwrap_err();
    assert!(
        matches!(again, VmError::AlreadyRunning { pid: running, .. } if running == pid),
        "{again}"
    );

    // After a re-attach QEMU is not watched as a child: a kill -9 is seen through the pidfd and,
    // without a SHUTDOWN event, reported as vanished (killed or crashed).
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = tokio::time::timeout(common::GUEST_DEADLINE, vm.wait_for_exit())
        .await
        .expect("exit reported");
    assert_eq!(exit.reason, QemuExitReason::Vanished);
    drop(vm);
    wait_for_process_gone(pid).await;

    // The pid file is gone or stale now: nothing to attach to.
    assert!(
        QemuVm::attach(run_dir.path(), uuid)
            .await
            .expect("attach")
            .is_none()
    );
}

#[tokio::test]
async fn stale_pid_file_of_another_program_is_ignored_and_removed() {
    let run_dir = run_directory();
    let pid_file = run_dir.path().join("qemu.pid");
    // Our own pid: alive, but not a QEMU.
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
    assert!(
        QemuVm::attach(run_dir.path(), uuid::Uuid::new_v4())
            .await
            .expect("attach")
            .is_none()
    );
    assert!(!pid_file.exists(), "stale pid file removed");
}

#[tokio::test]
async fn qemu_start_failure_carries_its_stderr_and_leaves_nothing_running() {
    let run_dir = run_directory();
    let mut spec = guest_spec("broken", run_dir.path(), None).await;
    if let Some(kernel) = spec.kernel.as_mut() {
        kernel.kernel = run_dir.path().join("no-such-vmlinuz");
    }
    let error = QemuVm::launch(&binaries(), &spec).await.unwrap_err();
    match &error {
        VmError::StartFailed { stderr, .. } => {
            assert!(stderr.contains("no-such-vmlinuz"), "{stderr}")
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(
        error.to_string().contains("broken"),
        "error names the vm: {error}"
    );
    assert!(!run_dir.path().join("qmp.sock").exists());
    assert!(!run_dir.path().join("qemu.pid").exists());
}

#[tokio::test]
async fn missing_qemu_binary_names_the_package() {
    let run_dir = run_directory();
    let error = novacron_qemu::QemuBinaries::from_paths(
        run_dir.path().join("qemu-system-x86_64"),
        "/usr/bin/qemu-img",
    )
    .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("apt-get install -y qemu-system-x86"),
        "{error}"
    );

    // A configured path that disappears later fails at launch with the path in the error.
    let binaries = novacron_qemu::QemuBinaries {
        system: run_dir.path().join("gone/qemu-system-x86_64"),
        img: "/usr/bin/qemu-img".into(),
    };
    let spec =
        novacron_qemu::LaunchSpec::new("nobinary", uuid::Uuid::new_v4(), run_dir.path().join("vm"));
    let error = QemuVm::launch(&binaries, &spec).await.unwrap_err();
    assert!(matches!(error, VmError::Binary(_)), "{error:?}");
    assert!(
        error.to_string().contains("gone/qemu-system-x86_64"),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains("apt-get install -y qemu-system-x86"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_workload_reports_progress_and_intact_memory() {
    let run_dir = run_directory();
    let (vm, _cleanup) = common::launch_workload_guest("workload", run_dir.path(), 16).await;
    let console = vm.run_directory().console_log();
    let log = wait_for_console(&console, "NOVACRON-WORKLOAD tick=3 ").await;
    // The shell's prompt on the same console may precede a line: look for the marker anywhere.
    let ticks: Vec<&str> = log
        .lines()
        .filter_map(|line| line.find("NOVACRON-WORKLOAD ").map(|start| &line[start..]))
        .collect();
    assert!(ticks.len() >= 3, "{log}");
    for line in &ticks {
        assert!(line.contains(" pages=4096 "), "16 MiB region: {line}");
        assert!(line.contains(" errors=0 "), "memory intact: {line}");
    }
    assert!(!log.contains("NOVACRON-WORKLOAD-CORRUPT"), "{log}");

    // Paused and resumed, the same process continues counting.
    vm.qmp().stop().await.expect("stop");
    vm.qmp().cont().await.expect("cont");
    wait_for_console(&console, "NOVACRON-WORKLOAD tick=5 ").await;
    vm.force_stop().await.expect("force stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_console_socket_is_interactive_and_logged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let run_dir = run_directory();
    let spec = guest_spec("console", run_dir.path(), None).await;
    let vm = QemuVm::launch(&binaries(), &spec).await.expect("launch");
    let _cleanup = common::KillOnDrop::new(&vm);
    let console_log = vm.run_directory().console_log();
    wait_for_console(&console_log, SHELL_BANNER).await;

    let mut console = tokio::net::UnixStream::connect(vm.run_directory().console_socket())
        .await
        .expect("connect to the console socket");
    // The shell computes the marker, so seeing it proves the input reached the guest.
    console
        .write_all(b"\necho console-$((6 * 7))-ok\n")
        .await
        .expect("write");
    let mut seen = Vec::new();
    let found = tokio::time::timeout(common::GUEST_DEADLINE, async {
        let mut buffer = [0u8; 4096];
        loop {
            let read = console.read(&mut buffer).await.expect("read");
            assert!(read > 0, "console closed");
            seen.extend_from_slice(&buffer[..read]);
            if String::from_utf8_lossy(&seen).contains("console-42-ok") {
                return;
            }
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "no echo on the console: {}",
        String::from_utf8_lossy(&seen)
    );
    // What the socket client saw is also in the log file.
    wait_for_console(&console_log, "console-42-ok").await;
    vm.force_stop().await.expect("force stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_forces_quit_when_the_guest_ignores_the_power_button() {
    let run_dir = run_directory();
    // Paused vCPUs cannot react to the ACPI power button.
    let spec = guest_spec("ignores", run_dir.path(), None)
        .await
        .start_paused(true);
    let vm = QemuVm::launch(&binaries(), &spec).await.expect("launch");
    let _cleanup = common::KillOnDrop::new(&vm);
    let status = vm.qmp().query_status().await.expect("query-status");
    assert_eq!(status.status, RunState::Prelaunch);
    let exit = vm
        .stop(std::time::Duration::from_secs(2))
        .await
        .expect("stop");
    assert_eq!(
        exit.reason,
        QemuExitReason::HostShutdown {
            reason: "host-qmp-quit".into()
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_told_apart_crash_versus_orderly_termination() {
    for (signal, expected) in [
        (
            "-SEGV",
            QemuExitReason::Crashed {
                signal: libc::SIGSEGV,
            },
        ),
        (
            "-TERM",
            QemuExitReason::HostShutdown {
                reason: "host-signal".into(),
            },
        ),
    ] {
        let run_dir = run_directory();
        let spec = guest_spec("signalled", run_dir.path(), None)
            .await
            .start_paused(true);
        let vm = QemuVm::launch(&binaries(), &spec).await.expect("launch");
        let _cleanup = common::KillOnDrop::new(&vm);
        let status = std::process::Command::new("kill")
            .args([signal, &vm.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let exit = tokio::time::timeout(common::GUEST_DEADLINE, vm.wait_for_exit())
            .await
            .expect("exit reported");
        assert_eq!(exit.reason, expected, "{signal}: {exit}");
        if signal == "-TERM" {
            assert!(
                exit.qemu_log_tail.contains("terminating on signal 15"),
                "{}",
                exit.qemu_log_tail
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_launches_into_one_run_directory_start_one_qemu() {
    let run_dir = run_directory();
    let spec = guest_spec("twice", run_dir.path(), None)
        .await
        .start_paused(true);
    let binaries = binaries();
    let (first, second) = tokio::join!(
        QemuVm::launch(&binaries, &spec),
        QemuVm::launch(&binaries, &spec)
    );
    let (running, refused) = match (first, second) {
        (Ok(vm), Err(error)) | (Err(error), Ok(vm)) => (vm, error),
        (first, second) => panic!("expected exactly one launch to succeed: {first:?} / {second:?}"),
    };
    let _cleanup = common::KillOnDrop::new(&running);
    assert!(
        matches!(
            refused,
            VmError::LaunchInProgress { .. } | VmError::AlreadyRunning { .. }
        ),
        "{refused:?}"
    );
    // The survivor's QMP socket was not removed by the refused launch.
    assert!(running.run_directory().qmp_socket().exists());
    running.qmp().query_status().await.expect("query-status");
    running.force_stop().await.expect("force stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_kernel_panic_is_reported_not_rebooted() {
    use tokio::io::AsyncWriteExt;

    let run_dir = run_directory();
    let spec = guest_spec("panics", run_dir.path(), None).await;
    let vm = QemuVm::launch(&binaries(), &spec).await.expect("launch");
    let _cleanup = common::KillOnDrop::new(&vm);
    // Input sent before the shell runs may be eaten by its terminal query: wait for its banner.
    wait_for_console(&vm.run_directory().console_log(), SHELL_BANNER).await;
    let console = tokio::net::UnixStream::connect(vm.run_directory().console_socket())
        .await
        .expect("connect to the console socket");
    // A connected console client must keep reading: QEMU's serial output waits for the socket,
    // and the guest's oops printout would crawl (regression: this test took 80 s without it).
    let (mut console_output, mut console_input) = console.into_split();
    let drain = tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut console_output, &mut sink).await;
    });
    console_input
        .write_all(b"\necho c > /proc/sysrq-trigger\n")
        .await
        .expect("write");
    let exit = tokio::time::timeout(common::GUEST_DEADLINE, vm.wait_for_exit())
        .await
        .expect("exit reported");
    assert_eq!(exit.reason, QemuExitReason::GuestPanicked, "{exit}");
    assert!(!exit.is_orderly());
    assert!(
        exit.console_log_tail.contains("sysrq"),
        "{}",
        exit.console_log_tail
    );
    drain.abort();
}
