//! End-to-end tests of a two-namespace emulated link: measured delay, loss, rate, trace replay,
//! queue overflow, jitter ordering and teardown, each against what was configured. They need
//! root (namespaces, TUN devices), as CI has.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use novacron_linkemu::{LinkDirection, LinkEmulator, RunningLink, cleanup_stale};
use support::{
    EchoServer, measure_round_trips, median, namespace_exists, send_paced, tcp_receive_rates,
    tcp_send_until_stopped, wait_until,
};

fn echo_on_b(link: &RunningLink) -> EchoServer {
    let address = link.addr_b();
    let socket = link
        .in_ns_b(move || UdpSocket::bind((address, 0)))
        .expect("enter namespace b")
        .expect("bind echo socket");
    EchoServer::start(socket)
}

fn udp_socket_in_a(link: &RunningLink) -> UdpSocket {
    let address = link.addr_a();
    link.in_ns_a(move || UdpSocket::bind((address, 0)))
        .expect("enter namespace a")
        .expect("bind client socket")
}

fn udp_socket_in_b(link: &RunningLink) -> UdpSocket {
    let address = link.addr_b();
    link.in_ns_b(move || UdpSocket::bind((address, 0)))
        .expect("enter namespace b")
        .expect("bind receiver socket")
}

/// Counts datagrams arriving on `socket` until `quiet` passes without one; returns the indexes.
fn receive_indexes(socket: &UdpSocket, quiet: Duration, limit: Duration) -> Vec<u64> {
    socket.set_read_timeout(Some(quiet)).expect("read timeout");
    let mut indexes = Vec::new();
    let mut buffer = vec![0u8; 2048];
    let started = Instant::now();
    while started.elapsed() < limit {
        match socket.recv(&mut buffer) {
            Ok(length) if length >= 8 => indexes.push(u64::from_be_bytes(
                buffer[..8].try_into().expect("eight bytes"),
            )),
            Ok(_) => {}
            Err(_) if !indexes.is_empty() => break,
            Err(_) => {}
        }
    }
    indexes
}

#[test]
fn round_trip_time_matches_configured_delay() {
    let link = LinkEmulator::builder()
        .name_prefix("rtt")
        .delay_for(LinkDirection::AToB, Duration::from_millis(15))
        .delay_for(LinkDirection::BToA, Duration::from_millis(25))
        .spawn()
        .expect("spawn link");
    let echo = echo_on_b(&link);
    let client = udp_socket_in_a(&link);
    let mut round_trips = measure_round_trips(&client, echo.address, 60, Duration::from_secs(2));
    assert!(
        round_trips.len() >= 55,
        "only {} probes answered",
        round_trips.len()
    );
    let minimum = *round_trips.iter().min().expect("answers");
    let median = median(&mut round_trips);
    let configured = Duration::from_millis(40);
    assert!(
        minimum >= configured,
        "round trip {minimum:?} shorter than configured {configured:?}"
    );
    assert!(
        median <= configured.mul_f64(1.10),
        "median round trip {median:?} more than 10 % above {configured:?}"
    );
}

/// `RcvbufErrors` of UDP in namespace B (`/proc/thread-self/net/snmp` reads the calling
/// thread's namespace).
fn udp_receive_buffer_errors(link: &RunningLink) -> u64 {
    let snmp = link
        .in_ns_b(|| std::fs::read_to_string("/proc/thread-self/net/snmp"))
        .expect("enter namespace b")
        .expect("read snmp counters");
    let mut udp_lines = snmp.lines().filter(|line| line.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp_lines.next(), udp_lines.next()) else {
        panic!("no Udp lines in snmp counters");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .expect("RcvbufErrors counter")
}

#[test]
fn loss_rate_matches_configured_probability() {
    let loss = 0.05;
    let link = LinkEmulator::builder()
        .name_prefix("loss")
        .direction(
            LinkDirection::AToB,
            novacron_linkemu::DirectionShape {
                loss,
                ..Default::default()
            },
        )
        .seed(42)
        .spawn()
        .expect("spawn link");
    let receiver = udp_socket_in_b(&link);
    let to: SocketAddr = receiver.local_addr().expect("bound");
    let sender = udp_socket_in_a(&link);
    let sent = 20_000u64;
    let receiving = std::thread::spawn(move || {
        receive_indexes(&receiver, Duration::from_secs(2), Duration::from_secs(60))
    });
    send_paced(&sender, to, sent, 100, 8_000.0);
    let received = receiving.join().expect("receiver thread").len() as u64;
    // Datagrams the receiving socket itself dropped (a starved test thread) are not link loss.
    let socket_drops = udp_receive_buffer_errors(&link);
    let measured = 1.0 - (received + socket_drops) as f64 / sent as f64;
    let counters = link.counters().a_to_b;
    assert!(
        (measured - loss).abs() <= loss * 0.10,
        "measured loss {measured:.4}, configured {loss}: {received} received, {socket_drops} \
         dropped by the receiving socket, link counters {counters:?}"
    );
    assert!(counters.dropped_by_loss > 0);
    assert_eq!(counters.dropped_by_queue, 0, "unlimited rate never queues");
}

#[test]
fn tcp_rate_matches_configured_rate() {
    // 50 Mbit/s: at 100 the forwarder needs more CPU than a busy 2-core VM (30 % steal
    // measured here) reliably gives it, and the limiter is the same code at any rate.
    let rate = 50e6;
    let link = LinkEmulator::builder()
        .name_prefix("rate")
        .delay(Duration::from_millis(10))
        .rate_bits_per_sec(rate)
        .spawn()
        .expect("spawn link");
    let address_b = link.addr_b();
    let listener = link
        .in_ns_b(move || TcpListener::bind((address_b, 0)))
        .expect("enter namespace b")
        .expect("bind listener");
    let to = listener.local_addr().expect("bound");
    let stop = Arc::new(AtomicBool::new(false));
    let stop_sender = Arc::clone(&stop);
    let stream = link
        .in_ns_a(move || TcpStream::connect_timeout(&to, Duration::from_secs(10)))
        .expect("enter namespace a")
        .expect("connect across the link");
    let sender = std::thread::spawn(move || tcp_send_until_stopped(stream, stop_sender));
    let goodputs = tcp_receive_rates(listener, Duration::from_secs(1), Duration::from_secs(1), 4);
    stop.store(true, Ordering::Relaxed);
    drop(link);
    let _ = sender.join();
    // The link counts IP bytes: a full 1500-byte packet carries 1448 bytes of TCP payload.
    let link_rates: Vec<f64> = goodputs
        .iter()
        .map(|goodput| goodput * 1500.0 / 1448.0)
        .collect();
    // The link's rate is what it delivers while TCP keeps it full. A second in which TCP backed
    // off after a tail drop measures TCP's congestion control, not the link, so the best second
    // is checked against the configured rate, and no second may exceed it.
    let best = link_rates.iter().copied().fold(0.0, f64::max);
    assert!(
        (best - rate).abs() <= rate * 0.10,
        "measured at best {:.1} Mbit/s on the link (1 s windows: {:?}), configured {:.1}",
        best / 1e6,
        link_rates
            .iter()
            .map(|rate| (rate / 1e5).round() / 10.0)
            .collect::<Vec<_>>(),
        rate / 1e6
    );
}

#[test]
fn trace_replay_delivers_the_trace_capacity() {
    // 100 ms period: 50 ms at 2 packets/ms, 50 ms at 6 packets/ms: 4000 packets/s, 48 Mbit/s.
    let directory = tempfile::tempdir().expect("temporary directory");
    let path = directory.path().join("square.trace");
    let mut text = String::new();
    for millisecond in 1..=100u32 {
        let per_millisecond = if millisecond <= 50 { 2 } else { 6 };
        for _ in 0..per_millisecond {
            text.push_str(&format!("{millisecond}\n"));
        }
    }
    std::fs::write(&path, text).expect("write trace");
    let link = LinkEmulator::builder()
        .name_prefix("trace")
        .delay(Duration::from_millis(5))
        .trace_a_to_b(&path)
        .queue_bytes(400_000)
        .spawn()
        .expect("spawn link");
    let receiver = udp_socket_in_b(&link);
    let to = receiver.local_addr().expect("bound");
    let sender = udp_socket_in_a(&link);
    let measuring = std::thread::spawn(move || {
        // Count 1500-byte datagrams between 1 s and 3 s after the first one.
        receiver
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut buffer = vec![0u8; 2048];
        let mut first: Option<Instant> = None;
        let mut counted = 0u64;
        loop {
            let length = receiver.recv(&mut buffer).expect("datagrams keep coming");
            assert_eq!(length, 1472);
            let now = Instant::now();
            let elapsed = now - *first.get_or_insert(now);
            if elapsed >= Duration::from_secs(3) {
                return counted;
            }
            if elapsed >= Duration::from_secs(1) {
                counted += 1;
            }
        }
    });
    // 1.5 times the trace's peak rate, so the queue never runs dry and every opportunity is used.
    send_paced(&sender, to, 9_000 * 4, 1472, 9_000.0);
    let delivered = measuring.join().expect("measuring thread");
    let expected = 8_000.0;
    assert!(
        (delivered as f64 - expected).abs() <= expected * 0.10,
        "delivered {delivered} packets in 2 s, the trace offers {expected}"
    );
    assert!(
        link.counters().a_to_b.dropped_by_queue > 0,
        "the sender outran the trace"
    );
}

#[test]
fn full_queue_drops_the_tail() {
    let queue = 30_000u64;
    let link = LinkEmulator::builder()
        .name_prefix("queue")
        .rate_bits_per_sec(10e6)
        .queue_bytes(queue)
        .spawn()
        .expect("spawn link");
    assert_eq!(link.queue_limit_bytes(LinkDirection::AToB), queue);
    let receiver = udp_socket_in_b(&link);
    let to = receiver.local_addr().expect("bound");
    let sender = udp_socket_in_a(&link);
    let sent = 400u64;
    // 1500-byte packets at 100 Mbit/s into a 10 Mbit/s bottleneck.
    send_paced(&sender, to, sent, 1472, 8_300.0);
    let received = receive_indexes(
        &receiver,
        Duration::from_millis(500),
        Duration::from_secs(20),
    );
    let counters = link.counters().a_to_b;
    assert!(counters.dropped_by_queue > sent / 2, "{counters:?}");
    assert_eq!(
        received.len() as u64 + counters.dropped_by_queue,
        sent,
        "{counters:?}"
    );
    // What got through is what the queue held plus what the rate drained during the burst.
    let burst_seconds = sent as f64 / 8_300.0;
    let bound = (queue / 1500) as f64 + burst_seconds * 10e6 / 12_000.0 + 5.0;
    assert!(
        (received.len() as f64) <= bound,
        "{} delivered, bound {bound}",
        received.len()
    );
}

#[test]
fn jitter_keeps_packet_order_unless_reordering_is_allowed() {
    for allow_reordering in [false, true] {
        let link = LinkEmulator::builder()
            .name_prefix("jitter")
            .delay(Duration::from_millis(10))
            .jitter(Duration::from_millis(4))
            .allow_reordering(allow_reordering)
            .spawn()
            .expect("spawn link");
        let receiver = udp_socket_in_b(&link);
        let to = receiver.local_addr().expect("bound");
        let sender = udp_socket_in_a(&link);
        let receiving = std::thread::spawn(move || {
            receive_indexes(
                &receiver,
                Duration::from_millis(300),
                Duration::from_secs(20),
            )
        });
        send_paced(&sender, to, 1000, 64, 2000.0);
        let indexes = receiving.join().expect("receiver thread");
        assert_eq!(indexes.len(), 1000);
        let out_of_order = indexes.windows(2).filter(|pair| pair[1] < pair[0]).count();
        if allow_reordering {
            assert!(out_of_order > 50, "only {out_of_order} reordered");
        } else {
            assert_eq!(out_of_order, 0);
        }
    }
}

#[test]
fn partition_drops_everything_until_healed() {
    let link = LinkEmulator::builder()
        .name_prefix("cut")
        .spawn()
        .expect("spawn link");
    let echo = echo_on_b(&link);
    let client = udp_socket_in_a(&link);
    assert_eq!(
        measure_round_trips(&client, echo.address, 3, Duration::from_secs(2)).len(),
        3
    );
    link.set_connected(false);
    assert!(measure_round_trips(&client, echo.address, 3, Duration::from_millis(200)).is_empty());
    assert!(link.counters().a_to_b.dropped_while_disconnected >= 3);
    link.set_connected(true);
    assert_eq!(
        measure_round_trips(&client, echo.address, 3, Duration::from_secs(2)).len(),
        3
    );
}

#[test]
fn shape_changes_while_the_link_runs() {
    let link = LinkEmulator::builder()
        .name_prefix("reshape")
        .delay(Duration::from_millis(2))
        .spawn()
        .expect("spawn link");
    let echo = echo_on_b(&link);
    let client = udp_socket_in_a(&link);
    let mut before = measure_round_trips(&client, echo.address, 10, Duration::from_secs(2));
    assert!(median(&mut before) < Duration::from_millis(10));
    link.set_shape(
        LinkDirection::AToB,
        novacron_linkemu::DirectionShape {
            delay: Duration::from_millis(30),
            ..link.shape(LinkDirection::AToB)
        },
    );
    let mut after = measure_round_trips(&client, echo.address, 10, Duration::from_secs(2));
    assert_eq!(after.len(), 10);
    let after = median(&mut after);
    assert!(
        after >= Duration::from_millis(32) && after <= Duration::from_millis(32).mul_f64(1.10),
        "round trip after reshaping {after:?}"
    );
    assert_eq!(
        link.shape(LinkDirection::AToB).delay,
        Duration::from_millis(30)
    );
    assert_eq!(
        link.shape(LinkDirection::BToA).delay,
        Duration::from_millis(2)
    );
}

fn root_devices() -> String {
    let output = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn teardown_leaves_no_namespace_or_device() {
    let link = LinkEmulator::builder()
        .name_prefix("teardown")
        .spawn()
        .expect("spawn link");
    let namespaces = [link.ns_a().to_owned(), link.ns_b().to_owned()];
    assert!(namespaces.iter().all(|name| namespace_exists(name)));
    // A setup failure part-way also cleans up: this trace does not exist.
    let failed = LinkEmulator::builder()
        .name_prefix("teardown")
        .trace("/nonexistent/trace")
        .spawn();
    assert!(failed.is_err());
    drop(link);
    assert!(namespaces.iter().all(|name| !namespace_exists(name)));
    let prefix = format!("nle-teardown-{}-", std::process::id());
    assert!(
        !novacron_linkemu::netns::list_namespaces()
            .iter()
            .any(|name| name.starts_with(&prefix)),
        "a namespace of this test survived"
    );
    // Devices live inside the namespaces and vanish with them; the only ones in the root
    // namespace are other tests' devices for the instant between creation and move.
    assert!(wait_until(Duration::from_secs(10), || !root_devices().contains("nlet")));
}

fn start_cli(arguments: &[&str]) -> (std::process::Child, serde_json::Value) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_novacron-linkemu"))
        .arg("up")
        .args(arguments)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start cli");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped stdout"))
        .read_line(&mut line)
        .expect("cli prints its link");
    let link: serde_json::Value = serde_json::from_str(&line).expect("json line");
    (child, link)
}

#[test]
fn cli_tears_down_on_sigterm() {
    let (mut child, link) =
        start_cli(&["--name-prefix", "clisig", "--delay", "5ms", "--loss", "1%"]);
    let namespace = link["ns_a"].as_str().expect("ns_a").to_owned();
    assert!(namespace_exists(&namespace));
    // The shell's builtin kill, so the test needs no procps.
    let status = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .expect("kill");
    assert!(status.success());
    assert!(wait_until(Duration::from_secs(10), || child
        .try_wait()
        .expect("wait")
        .is_some()));
    assert!(!namespace_exists(&namespace));
}

#[test]
fn cli_runs_a_command_over_the_link_and_returns_its_exit_code() {
    // The command sees the link through its environment; the link goes down when it exits.
    let output = Command::new(env!("CARGO_BIN_EXE_novacron-linkemu"))
        .args(["up", "--name-prefix", "clicmd", "--delay-a-to-b", "3ms"])
        .args(["--rate-b-to-a", "20mbit", "--loss-b-to-a", "0.1%", "--"])
        .args([
            "sh",
            "-c",
            "test -e /run/netns/$LINKEMU_NS_A && echo $LINKEMU_NS_B && exit 3",
        ])
        .stderr(Stdio::null())
        .output()
        .expect("run cli");
    assert_eq!(output.status.code(), Some(3));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines();
    let link: serde_json::Value =
        serde_json::from_str(lines.next().expect("link line")).expect("json");
    let namespace_b = link["ns_b"].as_str().expect("ns_b");
    assert_eq!(
        lines.next(),
        Some(namespace_b),
        "the command saw the namespaces"
    );
    let counters: serde_json::Value =
        serde_json::from_str(lines.next().expect("counters line")).expect("json");
    assert!(counters["counters"]["a_to_b"]["packets_received"].is_u64());
    assert!(!namespace_exists(namespace_b));
}

#[test]
fn leftovers_of_a_killed_run_are_cleaned_up() {
    let (mut child, link) = start_cli(&["--name-prefix", "clikill"]);
    let namespaces = [
        link["ns_a"].as_str().expect("ns_a").to_owned(),
        link["ns_b"].as_str().expect("ns_b").to_owned(),
    ];
    child.kill().expect("sigkill");
    child.wait().expect("reap");
    // Another test's setup may clean them up first; either way they must go.
    cleanup_stale().expect("cleanup");
    assert!(namespaces.iter().all(|name| !namespace_exists(name)));
}

fn pattern_byte(index: u64) -> u8 {
    (index.wrapping_mul(7) ^ (index >> 11)) as u8
}

#[test]
fn offloaded_super_packets_keep_data_intact_and_loss_per_segment() {
    let loss = 0.02;
    let link = LinkEmulator::builder()
        .name_prefix("offload")
        .delay(Duration::from_millis(5))
        .rate_bits_per_sec(200e6)
        .loss_for(LinkDirection::AToB, loss)
        .segmentation_offload(true)
        .seed(9)
        .spawn()
        .expect("spawn link");
    let address_b = link.addr_b();
    let listener = link
        .in_ns_b(move || TcpListener::bind((address_b, 0)))
        .expect("enter namespace b")
        .expect("bind listener");
    let to = listener.local_addr().expect("bound");
    let stream = link
        .in_ns_a(move || TcpStream::connect_timeout(&to, Duration::from_secs(10)))
        .expect("enter namespace a")
        .expect("connect across the link");
    let total: u64 = 30 * 1024 * 1024;
    let sender = std::thread::spawn(move || {
        use std::io::Write;
        let mut stream = stream;
        let mut offset = 0u64;
        let mut chunk = vec![0u8; 128 * 1024];
        while offset < total {
            let length = chunk.len().min((total - offset) as usize);
            for (index, byte) in chunk[..length].iter_mut().enumerate() {
                *byte = pattern_byte(offset + index as u64);
            }
            stream.write_all(&chunk[..length]).expect("send");
            offset += length as u64;
        }
    });
    let (mut stream, _) = listener.accept().expect("accept");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let mut received = 0u64;
    let mut buffer = vec![0u8; 256 * 1024];
    while received < total {
        let length = std::io::Read::read(&mut stream, &mut buffer).expect("receive");
        assert!(length > 0, "connection closed after {received} bytes");
        for (index, byte) in buffer[..length].iter().enumerate() {
            let at = received + index as u64;
            assert_eq!(*byte, pattern_byte(at), "corrupt byte at offset {at}");
        }
        received += length as u64;
    }
    sender.join().expect("sender");
    let counters = link.counters().a_to_b;
    let applied = counters.dropped_by_loss as f64 / counters.packets_received as f64;
    assert!(
        counters.packets_received > total / 1500,
        "counters are per wire segment: {counters:?}"
    );
    assert!(
        (applied - loss).abs() <= loss * 0.15,
        "loss applied per segment {applied:.4}, configured {loss}: {counters:?}"
    );
}
