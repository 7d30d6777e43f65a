//! Real QEMU streams through the parser and the rebuilder: the rebuilt stream is byte-identical
//! to QEMU's (BLAKE3 of both), and a destination QEMU loads it and the guest carries on with its
//! memory intact. Needs the test guest (`scripts/build-guest`) with its memory workload.

mod common;

use common::*;
use novacron_migration::{StreamEvent, StreamParser, StreamRebuilder, StreamStats};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What went through a pump.
struct Pumped {
    original_length: u64,
    original_checksum: blake3::Hash,
    rebuilt_length: u64,
    rebuilt_checksum: blake3::Hash,
    stats: StreamStats,
}

/// Reads a migration stream from `source` to its end, parses it, and writes the rebuilt stream
/// into `sink` as it goes.
async fn pump(mut source: impl AsyncRead + Unpin, mut sink: impl AsyncWrite + Unpin) -> Pumped {
    let mut parser = StreamParser::new();
    let mut rebuilder = StreamRebuilder::new();
    let mut original = blake3::Hasher::new();
    let mut rebuilt = blake3::Hasher::new();
    let mut original_length = 0u64;
    let mut buffer = vec![0u8; 256 << 10];
    let mut out = Vec::new();
    loop {
        let read = source
            .read(&mut buffer)
            .await
            .expect("read the source stream");
        if read == 0 {
            parser.finish();
        } else {
            original.update(&buffer[..read]);
            original_length += read as u64;
            parser.feed(&buffer[..read]);
        }
        while let Some(event) = parser.next_event().expect("qemu's stream parses") {
            rebuilder.write_event(&event, &mut out);
            // Pages are rebuilt from their parts, not copied: check one really was a page.
            if let StreamEvent::Page(page) = &event {
                assert!(!page.block.is_empty());
            }
        }
        rebuilt.update(&out);
        sink.write_all(&out)
            .await
            .expect("write the rebuilt stream");
        out.clear();
        if read == 0 {
            break;
        }
    }
    sink.flush().await.expect("flush");
    assert!(parser.is_done(), "stream complete: {:?}", parser.stats());
    Pumped {
        original_length,
        original_checksum: original.finalize(),
        rebuilt_length: rebuilder.length(),
        rebuilt_checksum: rebuilt.finalize(),
        stats: parser.stats().clone(),
    }
}

fn last_tick(log: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    workload_ticks(&text).last().expect("source ticks").tick
}

/// Migrates the running guest through parser + rebuilder into a destination QEMU with QEMU's
/// rate capped at `max_bandwidth`; checks byte identity and that the destination loaded the
/// stream. Returns the source's pass count, the destination and the source's last workload tick.
async fn live_migration_through_the_rebuilder(
    max_bandwidth: u64,
    source_dir: &std::path::Path,
    destination_dir: &std::path::Path,
) -> (u64, u64, novacron_qemu::QemuVm, Vec<KillOnDrop>) {
    let (source, source_guard) = launch(&guest_spec("mig-src", source_dir, None)).await;
    let source_console = source.run_directory().console_log();
    wait_for_console(&source_console, "NOVACRON-WORKLOAD tick=2 ").await;

    let incoming = destination_dir.join("in.sock");
    let (destination, destination_guard) = launch(&guest_spec(
        "mig-dst",
        destination_dir,
        Some(&format!("unix:{}", incoming.display())),
    ))
    .await;

    let outgoing = source_dir.join("out.sock");
    let listener = tokio::net::UnixListener::bind(&outgoing).expect("bind");
    set_max_bandwidth(&source, max_bandwidth).await;
    start_migration(&source, &format!("unix:{}", outgoing.display())).await;
    let (from_source, _) = listener.accept().await.expect("accept qemu's stream");
    let to_destination = tokio::net::UnixStream::connect(&incoming)
        .await
        .expect("connect to the destination's -incoming socket");
    let pumped = pump(from_source, to_destination).await;

    let source_info = wait_for_migration_status(&source, &["completed"]).await;
    assert_eq!(pumped.rebuilt_length, pumped.original_length);
    assert_eq!(pumped.rebuilt_checksum, pumped.original_checksum);
    let ram = &source_info["ram"];
    let passes = ram["dirty-sync-count"].as_u64().unwrap_or_default();
    let stats = &pumped.stats;
    assert!(
        stats.pages > 10_000 && stats.zero_pages > 1_000,
        "{stats:?}"
    );
    let passthrough = stats.passthrough.as_ref().expect("device state");
    assert!(
        passthrough.reason.contains("full section"),
        "{passthrough:?}"
    );
    // QEMU's own counts of pages sent match what the parser saw.
    assert_eq!(ram["normal"].as_u64(), Some(stats.pages), "{source_info}");
    assert_eq!(
        ram["duplicate"].as_u64(),
        Some(stats.zero_pages),
        "{source_info}"
    );
    println!(
        "live at {max_bandwidth} B/s: {} bytes, {} passes, {} ram sections, {} pages, {} zero pages, {} xbzrle, device state from offset {}",
        pumped.original_length,
        passes,
        stats.ram_sections,
        stats.pages,
        stats.zero_pages,
        stats.xbzrle_pages,
        passthrough.offset
    );

    // The destination's loader checks every section header, footer and ram record.
    let state = wait_until_loaded(&destination).await;
    assert_eq!(state, "paused", "loaded and waiting for cont");
    let source_tick = last_tick(&source_console);
    source.force_stop().await.expect("stop source");
    (
        passes,
        source_tick,
        destination,
        vec![source_guard, destination_guard],
    )
}

/// A live migration with several dirty-page passes (QEMU capped at 32 MiB/s while the workload
/// dirties 4 MiB/s): byte-identical, loaded by the destination, where the guest continues with
/// its whole workload region re-verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_multi_pass_stream_is_rebuilt_identically_and_the_guest_continues() {
    let source_dir = run_directory();
    let destination_dir = run_directory();
    let (passes, source_tick, destination, _guards) =
        live_migration_through_the_rebuilder(32 << 20, source_dir.path(), destination_dir.path())
            .await;
    assert!(passes >= 3, "several passes: {passes}");
    let ticks = resume_and_check_guest_continues(
        &destination,
        source_tick,
        TICKS_TO_VERIFY_WHOLE_REGION + 1,
    )
    .await;
    println!(
        "{passes} passes; destination continued from tick {source_tick} to {} with errors=0",
        ticks.last().unwrap().tick
    );
    destination.force_stop().await.expect("stop destination");
}

/// A fast live migration through parser + rebuilder: the guest continues on the destination, its
/// workload counter carries on from the source's, and its whole 64 MiB region is re-verified
/// there without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_through_the_rebuilder_resumes_the_guest() {
    let source_dir = run_directory();
    let destination_dir = run_directory();
    let (_passes, source_tick, destination, _guards) =
        live_migration_through_the_rebuilder(1 << 30, source_dir.path(), destination_dir.path())
            .await;
    let ticks = resume_and_check_guest_continues(
        &destination,
        source_tick,
        TICKS_TO_VERIFY_WHOLE_REGION + 1,
    )
    .await;
    println!(
        "destination continued from tick {source_tick} to {} with errors=0 (verified {} pages there)",
        ticks.last().unwrap().tick,
        ticks.last().unwrap().verified
    );
    destination.force_stop().await.expect("stop destination");
}

/// A paused guest saved to a file (`exec:cat > file`), the file parsed and rebuilt into a second
/// file, identical; a destination loads the rebuilt file (`-incoming exec:cat file`) and runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saved_stream_rebuilds_identically_and_loads() {
    let source_dir = run_directory();
    let destination_dir = run_directory();
    let (source, _source_guard) = launch(&guest_spec("save-src", source_dir.path(), None)).await;
    let source_console = source.run_directory().console_log();
    wait_for_console(&source_console, "NOVACRON-WORKLOAD tick=2 ").await;
    source.qmp().stop().await.expect("stop");
    let saved = source_dir.path().join("saved.mig");
    set_max_bandwidth(&source, 1 << 30).await;
    start_migration(&source, &format!("exec:cat > {}", saved.display())).await;
    wait_for_migration_status(&source, &["completed"]).await;

    let rebuilt = destination_dir.path().join("rebuilt.mig");
    let pumped = pump(
        tokio::fs::File::open(&saved).await.expect("open saved"),
        tokio::fs::File::create(&rebuilt)
            .await
            .expect("create rebuilt"),
    )
    .await;
    let saved_bytes = std::fs::read(&saved).expect("read saved");
    let rebuilt_bytes = std::fs::read(&rebuilt).expect("read rebuilt");
    assert_eq!(blake3::hash(&saved_bytes), blake3::hash(&rebuilt_bytes));
    assert_eq!(pumped.rebuilt_checksum, blake3::hash(&saved_bytes));
    assert!(
        saved_bytes.len() > 100 << 20,
        "256 MiB guest: {}",
        saved_bytes.len()
    );
    // Stopped: one pass, every page of every block exactly once, as PAGE or ZERO.
    let info = wait_for_migration_status(&source, &["completed"]).await;
    let total_bytes = info["ram"]["total"].as_u64().expect("ram total");
    assert_eq!(
        pumped.stats.pages + pumped.stats.zero_pages,
        total_bytes / 4096,
        "{info}"
    );
    println!(
        "saved: {} bytes, {} pages, {} zero pages",
        saved_bytes.len(),
        pumped.stats.pages,
        pumped.stats.zero_pages
    );
    drop(saved_bytes);
    drop(rebuilt_bytes);

    let (destination, _destination_guard) = launch(&guest_spec(
        "save-dst",
        destination_dir.path(),
        Some(&format!("exec:cat {}", rebuilt.display())),
    ))
    .await;
    let state = wait_until_loaded(&destination).await;
    assert_eq!(state, "paused");
    let source_tick = last_tick(&source_console);
    resume_and_check_guest_continues(&destination, source_tick, 2).await;
    destination.force_stop().await.expect("stop destination");
    source.force_stop().await.expect("stop source");
}
