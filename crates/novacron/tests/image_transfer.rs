//! `novacron image push/pull` between real `novacron serve` processes: on loopback, and over the
//! WAN link emulator (network namespaces; needs root, as the test suite runs). Images are raw
//! disks generated here: random, repeated and zero regions, so the codec has every tier to use.

mod common;

use common::{TestHost, poll};
use novacron_linkemu::LinkEmulator;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

const MIB: usize = 1 << 20;

/// Deterministic pseudo-random bytes (xorshift64*), so runs are comparable.
fn random_bytes(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(length + 8);
    while out.len() < length {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(length);
    out
}

/// 48 MiB: 16 MiB random, 16 MiB of one random MiB repeated, 16 MiB zeros.
fn base_image(seed: u64) -> Vec<u8> {
    let mut image = random_bytes(seed, 16 * MIB);
    let block = random_bytes(seed + 1, MIB);
    for _ in 0..16 {
        image.extend_from_slice(&block);
    }
    image.resize(48 * MIB, 0);
    image
}

/// The base with 64 scattered 4 KiB blocks rewritten, as a guest writing a few files would.
fn changed_image(base: &[u8]) -> Vec<u8> {
    let mut image = base.to_vec();
    let fresh = random_bytes(777, 64 * 4096);
    for index in 0..64 {
        let offset = (index * 733 + 11) % (base.len() / 4096) * 4096;
        image[offset..offset + 4096].copy_from_slice(&fresh[index * 4096..(index + 1) * 4096]);
    }
    image
}

fn write_image(host: &TestHost, name: &str, bytes: &[u8]) -> PathBuf {
    let path = host.directory.path().join(format!("{name}.raw"));
    std::fs::write(&path, bytes).expect("write test image");
    path
}

fn import(host: &TestHost, name: &str, bytes: &[u8]) -> Value {
    let path = write_image(host, name, bytes);
    host.json(&[
        "image",
        "import",
        path.to_str().expect("utf-8"),
        "--name",
        name,
    ])
}

fn fingerprint(host: &TestHost) -> String {
    host.json(&["host"])["fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_string()
}

/// Each host trusts the other.
fn pair(a: &TestHost, b: &TestHost) -> (String, String) {
    let (fingerprint_a, fingerprint_b) = (fingerprint(a), fingerprint(b));
    a.ok(&["peer", "trust", &fingerprint_b, "--name", "b"]);
    b.ok(&["peer", "trust", &fingerprint_a, "--name", "a"]);
    (fingerprint_a, fingerprint_b)
}

fn image_file(host: &TestHost, name: &str) -> Vec<u8> {
    let image = host.json(&["image", "show", name]);
    let id = image["id"].as_str().expect("id");
    std::fs::read(host.data_dir.join("images").join(format!("{id}.raw"))).expect("image file")
}

fn staging_is_empty(host: &TestHost) -> bool {
    std::fs::read_dir(host.data_dir.join("staging"))
        .map(|mut entries| entries.next().is_none())
        .unwrap_or(true)
}

fn image_names(host: &TestHost) -> Vec<String> {
    host.json(&["image", "list"])
        .as_array()
        .expect("list")
        .iter()
        .map(|image| image["name"].as_str().expect("name").to_string())
        .collect()
}

fn push_json(
    a: &TestHost,
    image: &str,
    b: &TestHost,
    fingerprint_b: &str,
    extra: &[&str],
) -> Value {
    let address = b.transfer_address();
    let mut arguments = vec![
        "image",
        "push",
        image,
        "--to",
        &address,
        "--fingerprint",
        fingerprint_b,
    ];
    arguments.extend_from_slice(extra);
    a.json(&arguments)
}

/// The destination's record of the incoming transfer of `image`.
fn incoming(host: &TestHost, image: &str) -> Value {
    host.json(&["transfer", "list"])
        .as_array()
        .expect("list")
        .iter()
        .find(|transfer| transfer["image"] == image)
        .cloned()
        .unwrap_or(Value::Null)
}

fn wait_for_transfer(host: &TestHost, id: &str, timeout: Duration) -> Value {
    poll(&format!("transfer {id} to end"), timeout, || {
        let info = host.json(&["transfer", "show", id]);
        (info["state"] != "running").then_some(info)
    })
}

#[test]
fn push_and_pull_between_two_hosts_keep_the_bytes_and_send_only_what_is_new() {
    let mut a = TestHost::start();
    let b = TestHost::start();
    let (_, fingerprint_b) = pair(&a, &b);
    let base = base_image(1);
    import(&a, "base", &base);

    // (a) push, bytes identical at the destination.
    let pushed = push_json(&a, "base", &b, &fingerprint_b, &[]);
    assert_eq!(pushed["state"], "succeeded", "{pushed}");
    assert_eq!(image_file(&b, "base"), base);
    let wire = pushed["wire_bytes"].as_u64().expect("wire bytes");
    eprintln!("first push: {} raw bytes, {wire} on the wire", base.len());
    // Zeros and the repeated MiB cost almost nothing; the random 16 MiB is sent once.
    assert!(
        wire < 20 * MIB as u64 && wire > 15 * MIB as u64,
        "first push put {wire} bytes on the wire"
    );
    // The destination records its end just after answering the sender.
    let received = poll(
        "the destination to record the push",
        Duration::from_secs(30),
        || {
            let received = incoming(&b, "base");
            (received["state"] != "running").then_some(received)
        },
    );
    assert_eq!(received["initiated_by_peer"], true, "{received}");
    assert_eq!(received["state"], "succeeded", "{received}");

    // Pushing it again finishes at once.
    let again = push_json(&a, "base", &b, &fingerprint_b, &[]);
    assert_eq!(again["already_present"], true, "{again}");
    assert_eq!(again["wire_bytes"], 0, "{again}");

    // Pull it back under another name (after deleting the original): identical bytes.
    a.ok(&["image", "delete", "base"]);
    let pulled = a.json(&[
        "image",
        "pull",
        "base",
        "--from",
        &b.transfer_address(),
        "--fingerprint",
        &fingerprint_b,
        "--name",
        "back",
    ]);
    assert_eq!(pulled["state"], "succeeded", "{pulled}");
    assert_eq!(image_file(&a, "back"), base);

    // (b) a similar image: only the changed chunks travel.
    let changed = changed_image(&base);
    import(&a, "changed", &changed);
    let second = push_json(&a, "changed", &b, &fingerprint_b, &[]);
    assert_eq!(second["state"], "succeeded", "{second}");
    assert_eq!(image_file(&b, "changed"), changed);
    let second_wire = second["wire_bytes"].as_u64().expect("wire bytes");
    eprintln!(
        "similar image: {} raw bytes, {second_wire} on the wire",
        changed.len()
    );
    // Measured: about 0.5 MiB for 64 changed 4 KiB blocks in 48 MiB (about 1 %).
    assert!(
        second_wire * 30 < changed.len() as u64,
        "the similar image put {second_wire} bytes on the wire for {} bytes",
        changed.len()
    );
    assert!(staging_is_empty(&a) && staging_is_empty(&b));

    // Finished transfers outlive a restart of `serve` (the history in the data directory).
    let ids = |list: &Value| -> Vec<String> {
        list.as_array()
            .expect("a list")
            .iter()
            .map(|info| info["id"].as_str().expect("id").to_string())
            .collect()
    };
    let before = ids(&a.json(&["transfer", "list"]));
    assert_eq!(before.len(), 4, "three pushes and a pull: {before:?}");
    a.stop_serve();
    a.spawn_serve();
    assert_eq!(ids(&a.json(&["transfer", "list"])), before);
    let first = pushed["id"].as_str().expect("id");
    let shown = a.json(&["transfer", "show", first]);
    assert_eq!(shown["state"], "succeeded", "{shown}");
    assert_eq!(shown["wire_bytes"], pushed["wire_bytes"], "{shown}");

    // Deleting images gives their chunk store space back: with both gone nothing is live, so
    // the packs are rewritten away, and a new push finds nothing to reuse.
    let packs = |host: &TestHost| -> u64 {
        std::fs::read_dir(host.data_dir.join("chunks").join("packs"))
            .expect("packs directory")
            .map(|entry| entry.expect("entry").metadata().expect("metadata").len())
            .sum()
    };
    assert!(packs(&b) > 15 * MIB as u64, "{} bytes in packs", packs(&b));
    b.ok(&["image", "delete", "base"]);
    b.ok(&["image", "delete", "changed"]);
    poll(
        "the destination's chunk store to give back the deleted images' space",
        Duration::from_secs(60),
        || (packs(&b) < MIB as u64).then_some(()),
    );
    let third = push_json(&a, "changed", &b, &fingerprint_b, &[]);
    assert_eq!(third["state"], "succeeded", "{third}");
    assert_eq!(image_file(&b, "changed"), changed);
    let third_wire = third["wire_bytes"].as_u64().expect("wire bytes");
    assert!(
        third_wire > 15 * MIB as u64,
        "after the deletions the destination still claimed chunks: {third_wire} bytes on the wire"
    );
}

#[test]
fn bad_transfer_requests_fail_clearly_and_leave_nothing() {
    let a = TestHost::start();
    let b = TestHost::start();
    let c = TestHost::start();
    let image = base_image(2);
    import(&a, "disk", &image);
    let fingerprint_b = fingerprint(&b);
    let address_b = b.transfer_address();

    let push = |image: &str, address: &str, fingerprint: &str, code: i32| {
        a.fails(
            &[
                "image",
                "push",
                image,
                "--to",
                address,
                "--fingerprint",
                fingerprint,
            ],
            code,
        )
    };
    let error = push("nope", &address_b, &fingerprint_b, 4);
    assert!(error.contains("\"nope\" does not exist"), "{error}");
    let error = push("disk", &address_b, "sha256:1234", 2);
    assert!(error.contains("not a host fingerprint"), "{error}");
    // B does not trust A yet.
    let error = push("disk", &address_b, &fingerprint_b, 3);
    assert!(
        error.contains("does not trust this host") && error.contains("novacron peer trust sha256:"),
        "{error}"
    );
    // C is not B: wrong fingerprint for the address.
    let error = push("disk", &c.transfer_address(), &fingerprint_b, 3);
    assert!(
        error.contains("is not the host with fingerprint"),
        "{error}"
    );
    let closed = format!("127.0.0.1:{}", common::free_port());
    let error = push("disk", &closed, &fingerprint_b, 8);
    assert!(error.contains("cannot connect"), "{error}");
    let error = a.fails(&["peer", "trust", "sha256:zz", "--name", "bad"], 2);
    assert!(error.contains("not a host fingerprint"), "{error}");

    // Name taken at the destination by another image.
    pair(&a, &b);
    import(&b, "disk", &base_image(3));
    let error = push("disk", &address_b, &fingerprint_b, 5);
    assert!(
        error.contains("already exists") && error.contains("--name"),
        "{error}"
    );
    // Pulling an image the peer lacks.
    let error = a.fails(
        &[
            "image",
            "pull",
            "ghost",
            "--from",
            &address_b,
            "--fingerprint",
            &fingerprint_b,
        ],
        4,
    );
    assert!(error.contains("ghost"), "{error}");

    assert_eq!(image_names(&b), vec!["disk".to_string()]);
    assert_eq!(image_names(&a), vec!["disk".to_string()]);
    assert_eq!(a.json(&["transfer", "list"]), serde_json::json!([]));
    assert!(staging_is_empty(&a) && staging_is_empty(&b));
    // After forgetting A, B refuses it again.
    b.ok(&["peer", "forget", "a"]);
    let error = push("disk", &address_b, &fingerprint_b, 3);
    assert!(error.contains("does not trust this host"), "{error}");
}

/// A link emulated at 100 Mbit/s with 20 ms round trips, and a host (not started) at each end.
/// An import answers once the image is stored and checked; its chunk-store and page indexes
/// are built after. A delete meanwhile waits for them and leaves no file; an image whose
/// indexing a `kill -9` of `serve` cut short is indexed at the next start.
#[test]
fn an_import_answers_before_its_indexes_and_a_delete_or_a_restart_meanwhile_loses_nothing() {
    let mut host = TestHost::start();
    let image = random_bytes(31, 64 * MIB);
    import(&host, "fresh", &image);
    host.ok(&["image", "delete", "fresh"]);
    let left: Vec<_> = std::fs::read_dir(host.data_dir.join("images"))
        .expect("the images directory")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert!(left.is_empty(), "nothing left of the image: {left:?}");

    let again = import(&host, "again", &image);
    let id = again["id"].as_str().expect("image id").to_string();
    host.kill_serve();
    host.spawn_serve();
    poll(
        "the image indexed (before the kill or after the restart)",
        Duration::from_secs(120),
        || {
            let indexed = host.serve_log().lines().any(|line| {
                line.contains("image indexed in the chunk store") && line.contains("again")
            });
            let pages = host.data_dir.join("images").join(format!("{id}.pages"));
            (indexed && pages.exists()).then_some(())
        },
    );
    assert_eq!(image_file(&host, "again"), image);
}

fn hosts_over_a_link(prefix: &str) -> (novacron_linkemu::RunningLink, TestHost, TestHost) {
    let link = LinkEmulator::builder()
        .name_prefix(prefix)
        .delay(Duration::from_millis(10))
        .rate_bits_per_sec(100e6)
        .spawn()
        .expect("spawn the link emulator (needs root)");
    let a = TestHost::in_namespace(link.ns_a(), &link.addr_a().to_string());
    let b = TestHost::in_namespace(link.ns_b(), &link.addr_b().to_string());
    (link, a, b)
}

/// Over an emulated 100 Mbit/s, 20 ms link: a cut mid-transfer is resumed by the transport; a
/// cancelled push, run again, resends only what the destination lacks.
#[test]
fn transfers_survive_a_cut_link_and_resume_after_cancel() {
    let (link, mut a, mut b) = hosts_over_a_link("xfer");
    a.spawn_serve();
    b.spawn_serve();
    let (_, fingerprint_b) = pair(&a, &b);

    // (c) cut the link for 3 s in the middle of a 32 MiB random push.
    let first = random_bytes(10, 32 * MIB);
    import(&a, "first", &first);
    let started = push_json(&a, "first", &b, &fingerprint_b, &["--no-wait"]);
    let id = started["id"].as_str().expect("id").to_string();
    poll(
        "a quarter of the image at the destination",
        Duration::from_secs(60),
        || {
            let done = incoming(&b, "first")["raw_bytes_done"]
                .as_u64()
                .unwrap_or(0);
            (done > first.len() as u64 / 4).then_some(())
        },
    );
    link.set_connected(false);
    let cut = std::time::Instant::now();
    poll("the cut to last 3 s", Duration::from_secs(10), || {
        (cut.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    link.set_connected(true);
    let finished = wait_for_transfer(&a, &id, Duration::from_secs(90));
    assert_eq!(finished["state"], "succeeded", "{finished}");
    eprintln!(
        "cut link: {} s, {} reconnections",
        finished["elapsed_seconds"], finished["reconnections"]
    );
    assert_eq!(image_file(&b, "first"), first);

    // (d) cancel half-way, then push again: the second run sends well under the full size.
    let second = random_bytes(20, 32 * MIB);
    import(&a, "second", &second);
    let started = push_json(&a, "second", &b, &fingerprint_b, &["--no-wait"]);
    let id = started["id"].as_str().expect("id").to_string();
    poll(
        "half of the image at the destination",
        Duration::from_secs(60),
        || {
            let done = incoming(&b, "second")["raw_bytes_done"]
                .as_u64()
                .unwrap_or(0);
            (done > second.len() as u64 / 2).then_some(())
        },
    );
    // Half-way, the sender shows an ETA (from the link forecast, or the measured rate before
    // the link has one) and the zstd level it chose.
    let running = a.json(&["transfer", "show", &id]);
    if running["state"] == "running" {
        assert!(running["eta_seconds"].is_number(), "{running}");
        assert!(running["zstd_level"].is_i64(), "{running}");
        eprintln!(
            "half-way: eta {} s ({}), link forecast {} bit/s, zstd level {}",
            running["eta_seconds"],
            running["eta_basis"],
            running["forecast_bits_per_second"],
            running["zstd_level"]
        );
    }
    a.ok(&["transfer", "cancel", &id]);
    let cancelled = wait_for_transfer(&a, &id, Duration::from_secs(30));
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    poll(
        "the destination to clean up",
        Duration::from_secs(30),
        || {
            let state = incoming(&b, "second")["state"].clone();
            (state != "running" && staging_is_empty(&b)).then_some(())
        },
    );
    assert_eq!(image_names(&b), vec!["first".to_string()]);

    let rerun = push_json(&a, "second", &b, &fingerprint_b, &[]);
    assert_eq!(rerun["state"], "succeeded", "{rerun}");
    assert_eq!(image_file(&b, "second"), second);
    let wire = rerun["wire_bytes"].as_u64().expect("wire bytes");
    eprintln!(
        "rerun after cancel: {} raw bytes, {wire} on the wire (cancelled run sent {})",
        second.len(),
        cancelled["wire_bytes"]
    );
    assert!(
        wire < second.len() as u64 * 6 / 10,
        "the rerun sent {wire} of {} bytes",
        second.len()
    );

    // The sender measured the link it sent over: one link, to b, at a rate the 100 Mbit/s
    // emulated link allows (random data keeps the sender ahead of the link, so its samples
    // measure the link), with a forecast.
    let links = a.json(&["link", "list"]);
    let links = links.as_array().expect("links");
    assert_eq!(links.len(), 1, "{links:?}");
    let measured = &links[0];
    assert_eq!(measured["peer_fingerprint"], fingerprint_b, "{measured}");
    let summary = &measured["summary"];
    let observed_seconds = summary["observed_seconds"].as_f64().expect("seconds");
    let mean_bits_per_second =
        summary["bytes_observed"].as_f64().expect("bytes") * 8.0 / observed_seconds;
    eprintln!(
        "link a→b: {observed_seconds:.1} s measured, mean {:.1} Mbit/s, forecasts {}",
        mean_bits_per_second / 1e6,
        summary["forecasts"]
    );
    assert!(observed_seconds >= 1.0, "{measured}");
    assert!(
        mean_bits_per_second < 110e6 && mean_bits_per_second > 5e6,
        "{measured}"
    );
    assert_eq!(
        summary["forecasts"][0]["horizon"], "one_second",
        "{measured}"
    );
    let shown = a.json(&["link", "show", &fingerprint_b]);
    assert_eq!(shown["peer_fingerprint"], fingerprint_b, "{shown}");
    // The receiver measured nothing: only sending measures a link.
    assert_eq!(b.json(&["link", "list"]), serde_json::json!([]));
    let missing = b.fails(&["link", "show", &fingerprint_b], 4);
    assert!(missing.contains("no link"), "{missing}");
    // The link's measurements outlive a restart of the sender.
    a.stop_serve();
    a.spawn_serve();
    let after = a.json(&["link", "show", &fingerprint_b]);
    assert_eq!(
        after["summary"]["observed_seconds"].as_f64(),
        Some(observed_seconds),
        "restored after the restart: {after}"
    );
    assert!(after["summary"]["forecasts"][0].is_object(), "{after}");
    drop(a);
    drop(b);
    link.shutdown().expect("tear the link down");
}

#[test]
fn a_link_probe_measures_an_idle_link_and_bad_probes_are_refused() {
    let a = TestHost::start();
    let b = TestHost::start();
    let c = TestHost::start();
    let (_, fingerprint_b) = pair(&a, &b);
    let links = a.json(&["link", "list"]);
    assert_eq!(links.as_array().map(Vec::len), Some(0), "{links}");

    // No address is known yet for B (nothing was ever sent to it): the probe asks for one.
    let error = a.fails(&["link", "probe", "b"], 2);
    assert!(error.contains("--address"), "{error}");
    let link = a.json(&[
        "link",
        "probe",
        "b",
        "--seconds",
        "2",
        "--address",
        &b.transfer_address(),
    ]);
    assert_eq!(link["peer_fingerprint"], fingerprint_b.as_str(), "{link}");
    assert!(link["last_measured_at"].as_u64().unwrap_or(0) > 0, "{link}");
    assert!(
        link["summary"]["observed_seconds"].as_f64().unwrap_or(0.0) > 0.5,
        "the probe's samples measure the link: {link}"
    );
    let forecasts = link["summary"]["forecasts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        forecasts
            .iter()
            .any(|forecast| forecast["expected_bits_per_sec"].as_f64().unwrap_or(0.0) > 1e6),
        "a probed link has a forecast: {link}"
    );
    // The address is remembered: a second probe needs none.
    a.ok(&["link", "probe", &fingerprint_b, "--seconds", "0.5"]);
    // Each probe ended by telling B to drop what was still on its way, not by waiting for it.
    let ended = |log: &str| {
        log.lines()
            .map(common::without_colours)
            .filter(|line| {
                line.contains("link probe received") && line.contains("ended_by_prober=true")
            })
            .count()
    };
    poll(
        "both probes ended by ProbeDone in B's log",
        Duration::from_secs(30),
        || (ended(&b.serve_log()) >= 2).then_some(()),
    );

    for seconds in ["0", "31", "nan"] {
        let error = a.fails(&["link", "probe", "b", "--seconds", seconds], 2);
        assert!(error.contains("at most 30 seconds"), "{seconds}: {error}");
    }
    let error = a.fails(&["link", "probe", "nobody"], 4);
    assert!(error.contains("nobody"), "{error}");
    // C is trusted by A but does not trust A: its listener refuses the probe's handshake.
    let fingerprint_c = fingerprint(&c);
    a.ok(&["peer", "trust", &fingerprint_c, "--name", "c"]);
    let error = a.fails(
        &["link", "probe", "c", "--address", &c.transfer_address()],
        3,
    );
    assert!(error.contains("does not trust this host"), "{error}");
    assert!(
        !a.json(&["link", "list"])
            .as_array()
            .is_some_and(|links| links
                .iter()
                .any(|link| link["peer_fingerprint"] == fingerprint_c.as_str()
                    && link["last_measured_at"].as_u64().unwrap_or(0) > 0)),
        "a refused probe measures nothing"
    );
}

/// Unmounts a tmpfs at drop (lazily: a serve still holding files in it lets go at exit).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Fills the file system of `path` until it is full (or `mib` MiB are written).
fn fill(path: &std::path::Path, mib: usize) {
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", &format!("count={mib}")])
        .arg(format!("of={}", path.display()))
        .output();
}

/// A destination whose disk is too small is refused before anything is sent; one whose disk
/// fills while the image arrives (over an emulated 100 Mbit/s link, so it takes seconds) fails
/// the transfer with the reason, and leaves no image and no staged file behind; once there is
/// room again, the same push succeeds.
#[test]
fn a_push_to_a_host_whose_disk_is_or_becomes_full_fails_clearly_and_leaves_nothing() {
    let (link, mut a, mut b) = hosts_over_a_link("xfull");
    // B's data directory on a 200 MiB tmpfs: room for a 64 MiB image and the receiver's
    // 64 MiB headroom, not for much more.
    std::fs::create_dir_all(&b.data_dir).expect("data dir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=200m", "tmpfs"])
        .arg(&b.data_dir)
        .status()
        .expect("mount");
    assert!(mounted.success(), "mounting a tmpfs needs root");
    let _unmount = Unmount(b.data_dir.clone());
    a.spawn_serve();
    b.spawn_serve();
    let (_, fingerprint_b) = pair(&a, &b);
    let image = random_bytes(30, 64 * MIB);
    import(&a, "big", &image);
    let filler = b.data_dir.join("filler");

    // Too little room from the start: refused before a byte of the image is sent.
    fill(&filler, 100);
    let address_b = b.transfer_address();
    let push = [
        "image",
        "push",
        "big",
        "--to",
        &address_b,
        "--fingerprint",
        &fingerprint_b,
    ];
    let error = a.fails(&push, 7);
    assert!(
        error.contains("not enough disk space on host") && error.contains("needed"),
        "{error}"
    );
    std::fs::remove_file(&filler).expect("remove the filler");

    // Room at the start, none half-way.
    let started = push_json(&a, "big", &b, &fingerprint_b, &["--no-wait"]);
    let id = started["id"].as_str().expect("id").to_string();
    poll(
        "a quarter of the image at the destination",
        Duration::from_secs(60),
        || {
            let done = incoming(&b, "big")["raw_bytes_done"].as_u64().unwrap_or(0);
            (done > image.len() as u64 / 4).then_some(())
        },
    );
    fill(&filler, 400);
    let failed = wait_for_transfer(&a, &id, Duration::from_secs(90));
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["error_code"], "insufficient_resources", "{failed}");
    let reason = failed["message"].as_str().unwrap_or_default();
    assert!(
        reason.contains("not enough disk space") && reason.contains("No space left"),
        "{failed}"
    );
    poll(
        "the destination to clean up",
        Duration::from_secs(30),
        || {
            let state = incoming(&b, "big")["state"].clone();
            (state != "running" && staging_is_empty(&b)).then_some(())
        },
    );
    assert_eq!(image_names(&b), Vec::<String>::new());

    // Room again: the same push succeeds, byte for byte.
    std::fs::remove_file(&filler).expect("remove the filler");
    let rerun = push_json(&a, "big", &b, &fingerprint_b, &[]);
    assert_eq!(rerun["state"], "succeeded", "{rerun}");
    assert_eq!(image_file(&b, "big"), image);
    drop(a);
    drop(b);
    link.shutdown().expect("tear the link down");
}
