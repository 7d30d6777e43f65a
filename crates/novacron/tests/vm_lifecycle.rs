//! End-to-end VM lifecycle on one host: real `novacron serve`, real CLI, real QEMU guests.

mod common;

use common::{TestHost, poll, process_alive};
use std::time::Duration;

#[test]
fn vm_boots_pauses_stops_restarts_and_is_deleted_without_leftovers() {
    let host = TestHost::start();
    host.import_guest_image("guest");
    let images = host.json(&["image", "list"]);
    assert_eq!(images[0]["name"], "guest");
    assert_eq!(images[0]["format"], "qcow2");
    let id = images[0]["id"].as_str().expect("id").to_string();
    assert_eq!(id.len(), 64, "blake3 hex id");
    let images_dir = host.data_dir.join("images");
    // The import saves the image's page index beside it (migrations load it), after it answered.
    common::poll(
        "the image's page index beside it",
        Duration::from_secs(60),
        || {
            images_dir
                .join(format!("{id}.pages"))
                .exists()
                .then_some(())
        },
    );

    let created = host.create_guest_vm("life", "guest", &[]);
    assert_eq!(
        created["status"]["state"], "running",
        "create waits until running"
    );
    assert_eq!(
        created["status"]["accelerator"], "tcg",
        "kvm cannot run guests on this machine"
    );
    assert!(
        created["status"]["accelerator_reason"]
            .as_str()
            .is_some_and(|reason| !reason.is_empty())
    );
    let uuid = created["uuid"].as_str().expect("uuid").to_string();
    let directory = host.vm_directory(&uuid);
    assert!(
        directory.join("disk.qcow2").exists(),
        "the disk overlay exists"
    );
    host.wait_for_console("life", "NOVACRON-GUEST-READY");
    host.wait_for_console("life", "NOVACRON-DISK vda 67108864");

    let paused = host.json(&["vm", "pause", "life"]);
    assert_eq!(paused["status"]["state"], "paused");
    let resumed = host.json(&["vm", "resume", "life"]);
    assert_eq!(resumed["status"]["state"], "running");

    // ACPI power-down: the guest shuts itself down well before the timeout forces it.
    let stopped = host.json(&["vm", "stop", "life", "--timeout", "60"]);
    assert_eq!(stopped["status"]["state"], "stopped");
    let pid = created["status"]["pid"].as_u64().expect("pid");
    assert!(!process_alive(pid), "qemu {pid} is gone after stop");

    let started = host.json(&["vm", "start", "life"]);
    assert_eq!(started["status"]["state"], "running");
    let first_pid = started["status"]["pid"].as_u64().expect("pid");
    host.wait_for_console("life", "NOVACRON-GUEST-READY");
    let restarted = host.json(&["vm", "restart", "life"]);
    assert_eq!(restarted["status"]["state"], "running");
    let second_pid = restarted["status"]["pid"].as_u64().expect("pid");
    assert_ne!(first_pid, second_pid, "restart runs a new qemu");
    assert!(!process_alive(first_pid));

    // The console log survives restarts of the VM: two boots so far after the restart.
    poll("two boots in the log", Duration::from_secs(90), || {
        (host
            .serial_log("life")
            .matches("NOVACRON-GUEST-READY")
            .count()
            >= 3)
            .then_some(())
    });

    let list = host.json(&["vm", "list"]);
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    let refused = host.fails(&["vm", "delete", "life"], 6);
    assert!(refused.contains("--force"), "{refused}");
    host.ok(&["vm", "delete", "life", "--force"]);
    host.fails(&["vm", "show", "life"], 4);
    assert!(!directory.exists(), "vm directory removed");
    assert!(!process_alive(second_pid), "qemu killed on delete");
    host.ok(&["image", "delete", "guest"]);
    assert_eq!(
        host.json(&["image", "list"]).as_array().map(Vec::len),
        Some(0)
    );
    let left: Vec<_> = std::fs::read_dir(&images_dir)
        .expect("images dir")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert!(
        left.is_empty(),
        "image file and page index removed: {left:?}"
    );
}

#[test]
fn vm_created_without_start_stays_stopped_and_events_report_changes() {
    let host = TestHost::start();
    host.import_guest_image("img");
    let mut events = std::process::Command::new(common::BINARY)
        .args(["events", "--output", "json"])
        .env("NOVACRON_SERVER", host.server())
        .env("NOVACRON_DATA_DIR", &host.data_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("events");
    let created = host.create_guest_vm("quiet", "img", &["--no-start"]);
    assert_eq!(created["status"]["state"], "stopped");
    host.ok(&["vm", "start", "quiet"]);
    host.ok(&["vm", "delete", "quiet", "--force"]);
    // The event stream saw the VM run and disappear.
    let stdout = events.stdout.take().expect("stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    poll(
        "running and deleted events",
        Duration::from_secs(30),
        || {
            while let Ok(line) = receiver.try_recv() {
                seen.push(line);
            }
            let running = seen.iter().any(|line| line.contains("\"running\""));
            let deleted = seen.iter().any(|line| line.contains("\"state\":null"));
            (running && deleted).then_some(())
        },
    );
    let _ = events.kill();
    let _ = events.wait();
}

#[test]
fn console_websocket_is_interactive() {
    let host = TestHost::start();
    host.import_guest_image("img");
    host.create_guest_vm("chat", "img", &[]);
    host.wait_for_console("chat", "NOVACRON-GUEST-READY");
    let token = std::fs::read_to_string(host.data_dir.join("admin.token")).expect("token");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let url = format!("ws://127.0.0.1:{}/api/v1/vms/chat/console", host.port);
    let answer = runtime.block_on(async move {
        use futures::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut request = url.into_client_request().expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", token.trim()).parse().expect("header"),
        );
        let (mut socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("connect");
        socket
            .send(Message::Binary(b"echo $((6*7))-novacron\n".to_vec().into()))
            .await
            .expect("send");
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout_at(deadline, socket.next()).await {
                Ok(Some(Ok(Message::Binary(data)))) => seen.extend_from_slice(&data),
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
            if String::from_utf8_lossy(&seen).contains("42-novacron") {
                break;
            }
        }
        String::from_utf8_lossy(&seen).to_string()
    });
    assert!(
        answer.contains("42-novacron"),
        "the guest shell answered through the console: {answer:?}"
    );
    // Without a token the console is refused.
    let refused = common::http_get_status(&format!("{}/api/v1/vms/chat/console", host.server()));
    assert_eq!(refused, Some(401));
}

#[test]
fn metrics_are_served_to_token_holders() {
    let host = TestHost::start();
    let token = std::fs::read_to_string(host.data_dir.join("admin.token")).expect("token");
    let url = format!("{}/metrics", host.server());
    assert_eq!(
        common::http_get_status(&url),
        Some(401),
        "metrics need the token"
    );
    let body = poll(
        "the store gauges to be exported",
        Duration::from_secs(30),
        || {
            let output = std::process::Command::new("curl")
                .args([
                    "-s",
                    "-H",
                    &format!("Authorization: Bearer {}", token.trim()),
                    &url,
                ])
                .output()
                .ok()?;
            let body = String::from_utf8_lossy(&output.stdout).to_string();
            body.contains("novacron_store_is_leader 1").then_some(body)
        },
    );
    for metric in [
        "novacron_api_requests_total",
        "novacron_store_term",
        "novacron_qemu_launches_total",
        "novacron_transfer_parked_connections",
        "novacron_transfer_connections_reused_total",
        "novacron_migration_boot_files_indexed",
    ] {
        assert!(body.contains(metric), "{metric} is exported:\n{body}");
    }
}
