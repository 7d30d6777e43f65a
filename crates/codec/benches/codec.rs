//! Codec benchmark (not a test): prints markdown tables comparing the codec with baselines
//! measured in the same run. See bench/codec/README.md.
//!
//! Environment:
//! - `CODEC_BENCH_IMAGES` directory holding `base.raw` and `extra.raw` (default
//!   `<workspace>/.cache/codec`, built by `bench/codec/make-debian-images.sh`); the disk part is
//!   skipped when they are missing.
//! - `CODEC_BENCH_RAM_IMAGE` any file to encode as guest RAM (a RAM dump of a booted guest).
//! - `CODEC_BENCH_LINK_MBIT` link rate the zstd level is chosen for (default 100).
//! - `CODEC_BENCH_LEVEL` use this zstd level for the disk part instead of measuring levels.
//! - `CODEC_BENCH_PAGES` pages per RAM case (default 65536 = 256 MiB).
//! - `CODEC_BENCH_RAM_LEVEL` zstd level of the RAM part, codec and baseline alike (default 3).
//! - `CODEC_BENCH_SKIP` comma list of parts to skip: `ram`, `disk`, `baselines`.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use novacron_codec::chunk::{ChunkDecoder, ChunkDecoderConfig, ChunkEncoder, ChunkEncoderConfig};
use novacron_codec::level::LevelMeter;
use novacron_codec::page::{PageEncoder, PageEncoderConfig};
use novacron_codec::{
    ChunkStore, ContentHash, MemoryRepository, NothingRemote, PAGE_SIZE, StoreRepository,
};

fn environment(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|value| !value.is_empty())
}

fn skipped(part: &str) -> bool {
    environment("CODEC_BENCH_SKIP")
        .is_some_and(|list| list.split(',').any(|item| item.trim() == part))
}

fn xorshift_fill(buffer: &mut [u8], seed: u64) {
    let mut state = seed | 1;
    for word in buffer.chunks_exact_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        word.copy_from_slice(&state.to_le_bytes());
    }
}

fn text_fill(buffer: &mut [u8], seed: u64) {
    const WORDS: [&str; 16] = [
        "static ",
        "int ",
        "return ",
        "struct page *",
        "kmalloc(",
        "GFP_KERNEL",
        ");\n",
        "if (",
        "NULL",
        ") {\n",
        "\t",
        "migration",
        "buffer",
        "the ",
        "= 0;\n",
        "/* dirty */ ",
    ];
    let mut state = seed | 1;
    let mut position = 0;
    while position < buffer.len() {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let word = WORDS[(state >> 59) as usize % WORDS.len()].as_bytes();
        let take = word.len().min(buffer.len() - position);
        buffer[position..position + take].copy_from_slice(&word[..take]);
        position += take;
    }
}

/// CPU time of the calling thread, from /proc/thread-self/schedstat (first field, ns): on a
/// shared machine, wall time counts time spent waiting for a core, CPU time does not.
fn thread_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|text| {
            text.split_whitespace()
                .next()
                .and_then(|field| field.parse::<u64>().ok())
        })
        .map_or(0.0, |nanoseconds| nanoseconds as f64 / 1e9)
}

/// Wall and CPU seconds of `work`.
fn timed<T>(work: impl FnOnce() -> T) -> (T, f64, f64) {
    let cpu_before = thread_cpu_seconds();
    let started = Instant::now();
    let result = work();
    (
        result,
        started.elapsed().as_secs_f64(),
        thread_cpu_seconds() - cpu_before,
    )
}

fn gigabytes_per_second(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / seconds.max(1e-9) / 1e9
}

struct RamRow {
    case: String,
    input_bytes: u64,
    codec: Measured,
    baseline: Measured,
    tiers: String,
}

/// Wire bytes with the wall and CPU seconds it took to produce them.
struct Measured {
    wire: u64,
    seconds: f64,
    cpu_seconds: f64,
}

/// Encodes `pages` (keys `pc.ram` + index × 4 KiB) after `warm_up` pages sent untimed (content
/// the destination got earlier in the transfer); `second_pass` is then sent to the same keys,
/// and only that pass is timed when given.
fn encode_pages(
    pages: &[u8],
    warm_up: &[u8],
    level: i32,
    remote: MemoryRepository,
) -> (Measured, novacron_codec::PageStats) {
    let mut encoder = PageEncoder::new(
        PageEncoderConfig {
            zstd_level: level,
            ..Default::default()
        },
        remote,
    )
    .unwrap();
    let mut frame = Vec::with_capacity(2 << 20);
    send_pages(&mut encoder, "warm-up", warm_up, &mut frame);
    let before = encoder.stats().frame_bytes;
    let ((), seconds, cpu_seconds) =
        timed(|| send_pages(&mut encoder, "pc.ram", pages, &mut frame));
    let measured = Measured {
        wire: encoder.stats().frame_bytes - before,
        seconds,
        cpu_seconds,
    };
    (measured, encoder.stats().clone())
}

fn send_pages<Q: novacron_codec::RemoteHashQuery>(
    encoder: &mut PageEncoder<Q>,
    block: &str,
    pages: &[u8],
    frame: &mut Vec<u8>,
) {
    for (index, page) in pages.as_chunks::<PAGE_SIZE>().0.iter().enumerate() {
        if encoder
            .push_page(block, index as u64 * PAGE_SIZE as u64, page)
            .unwrap()
        {
            frame.clear();
            encoder.finish_frame(frame).unwrap();
        }
    }
    frame.clear();
    encoder.finish_frame(frame).unwrap();
}

/// Baseline: zstd at `level` over the same pages in 1 MiB pieces (what a generic compressed
/// stream such as QEMU's multifd+zstd does, without tiers).
fn zstd_baseline(pages: &[u8], level: i32) -> Measured {
    let mut compressor = zstd::bulk::Compressor::new(level).unwrap();
    let (wire, seconds, cpu_seconds) = timed(|| {
        pages
            .chunks(1 << 20)
            .map(|piece| compressor.compress(piece).unwrap().len() as u64)
            .sum()
    });
    Measured {
        wire,
        seconds,
        cpu_seconds,
    }
}

fn tiers(stats: &novacron_codec::PageStats) -> String {
    format!(
        "zero {} · sent {} · dest {} · delta {} · literal {}",
        stats.zero_pages,
        stats.known_from_transfer,
        stats.known_from_destination,
        stats.delta_pages,
        stats.literal_pages
    )
}

fn ram_case(
    case: &str,
    pages: &[u8],
    warm_up: &[u8],
    level: i32,
    remote: MemoryRepository,
) -> RamRow {
    let (codec, stats) = encode_pages(pages, warm_up, level, remote);
    RamRow {
        case: case.to_owned(),
        input_bytes: pages.len() as u64,
        codec,
        baseline: zstd_baseline(pages, level),
        tiers: tiers(&stats),
    }
}

fn print_ram_table(rows: &[RamRow], level: i32) {
    println!("\n### RAM pages, one core (zstd level {level} in both columns)\n");
    println!(
        "GB/s per core = input bytes / CPU time of the encoding thread; in brackets, input bytes / \
         elapsed time (the machine is shared, so elapsed time includes waiting for a core).\n"
    );
    println!(
        "| case | input MiB | codec wire bytes | codec ratio | codec GB/s per core (elapsed) | \
         zstd -{level} (1 MiB blocks) wire bytes | zstd ratio | zstd GB/s per core (elapsed) | codec tiers |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for row in rows {
        println!(
            "| {} | {:.0} | {} | {:.1}× | {:.2} ({:.2}) | {} | {:.1}× | {:.2} ({:.2}) | {} |",
            row.case,
            row.input_bytes as f64 / (1 << 20) as f64,
            row.codec.wire,
            row.input_bytes as f64 / row.codec.wire.max(1) as f64,
            gigabytes_per_second(row.input_bytes, row.codec.cpu_seconds),
            gigabytes_per_second(row.input_bytes, row.codec.seconds),
            row.baseline.wire,
            row.input_bytes as f64 / row.baseline.wire.max(1) as f64,
            gigabytes_per_second(row.input_bytes, row.baseline.cpu_seconds),
            gigabytes_per_second(row.input_bytes, row.baseline.seconds),
            row.tiers,
        );
    }
}

fn ram_part(level: i32) {
    let page_count: usize = environment("CODEC_BENCH_PAGES")
        .and_then(|value| value.parse().ok())
        .unwrap_or(65_536);
    let bytes = page_count * PAGE_SIZE;
    let mut rows = Vec::new();

    // Zero pages: write the buffer so that it is backed by real memory, not the kernel's zero page.
    let mut zero = vec![1u8; bytes];
    zero.fill(0);
    rows.push(ram_case(
        "zero pages",
        &zero,
        &[],
        level,
        MemoryRepository::new(),
    ));
    drop(zero);

    // Duplicates of 256 pages sent earlier in the transfer (e.g. page cache copies, re-sent pages).
    let mut pool = vec![0u8; 256 * PAGE_SIZE];
    xorshift_fill(&mut pool, 42);
    let mut duplicates = vec![0u8; bytes];
    for (index, page) in duplicates.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let source = (index * 97) % 256;
        page.copy_from_slice(&pool[source * PAGE_SIZE..(source + 1) * PAGE_SIZE]);
    }
    rows.push(ram_case(
        "duplicate pages (sent earlier)",
        &duplicates,
        &pool,
        level,
        MemoryRepository::new(),
    ));

    // Duplicates of pages held in the destination's chunk store (an image it has).
    let mut remote = MemoryRepository::new();
    for page in pool.chunks_exact(PAGE_SIZE) {
        remote.insert(page);
    }
    rows.push(ram_case(
        "duplicate pages (destination store)",
        &duplicates,
        &[],
        level,
        remote,
    ));
    drop(duplicates);

    let mut random = vec![0u8; bytes];
    xorshift_fill(&mut random, 7);
    rows.push(ram_case(
        "random pages",
        &random,
        &[],
        level,
        MemoryRepository::new(),
    ));
    drop(random);

    let mut text = vec![0u8; bytes];
    text_fill(&mut text, 9);
    rows.push(ram_case(
        "text-like pages",
        &text,
        &[],
        level,
        MemoryRepository::new(),
    ));

    // The same pages sent again with 40 bytes of each rewritten: the delta tier. The first pass
    // goes to the same keys, untimed.
    let mut dirtied = text.clone();
    for (index, page) in dirtied.chunks_exact_mut(PAGE_SIZE).enumerate() {
        let at = (index * 131) % (PAGE_SIZE - 40);
        xorshift_fill(&mut page[at..at + 40], index as u64 + 1);
    }
    let mut encoder = PageEncoder::new(
        PageEncoderConfig {
            zstd_level: level,
            ..Default::default()
        },
        NothingRemote,
    )
    .unwrap();
    let mut frame = Vec::new();
    send_pages(&mut encoder, "pc.ram", &text, &mut frame);
    let first_pass = encoder.stats().clone();
    let ((), seconds, cpu_seconds) =
        timed(|| send_pages(&mut encoder, "pc.ram", &dirtied, &mut frame));
    let stats = encoder.stats();
    rows.push(RamRow {
        case: "text pages re-sent, 1 % of each changed".to_owned(),
        input_bytes: dirtied.len() as u64,
        codec: Measured {
            wire: stats.frame_bytes - first_pass.frame_bytes,
            seconds,
            cpu_seconds,
        },
        baseline: zstd_baseline(&dirtied, level),
        tiers: format!(
            "(second pass) delta {} · literal {}",
            stats.delta_pages - first_pass.delta_pages,
            stats.literal_pages - first_pass.literal_pages
        ),
    });
    drop(text);
    drop(dirtied);

    if let Some(path) = environment("CODEC_BENCH_RAM_IMAGE") {
        let mut image = Vec::new();
        File::open(&path)
            .and_then(|mut file| file.read_to_end(&mut image))
            .expect("reading CODEC_BENCH_RAM_IMAGE");
        image.truncate(image.len() / PAGE_SIZE * PAGE_SIZE);
        rows.push(ram_case(
            &format!("RAM image {path}"),
            &image,
            &[],
            level,
            MemoryRepository::new(),
        ));
    }
    print_ram_table(&rows, level);
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn file_hash(path: &Path) -> ContentHash {
    let mut hasher = blake3::Hasher::new();
    let mut file = BufReader::with_capacity(8 << 20, File::open(path).unwrap());
    let mut buffer = vec![0u8; 8 << 20];
    loop {
        let read = file.read(&mut buffer).unwrap();
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    ContentHash(*hasher.finalize().as_bytes())
}

/// Runs `command`, returning the bytes it wrote to stdout and the seconds it took.
fn count_stdout(command: &mut Command) -> Option<(u64, f64)> {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut stdout = child.stdout.take()?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        match stdout.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => total += read as u64,
            Err(_) => return None,
        }
    }
    child
        .wait()
        .ok()?
        .success()
        .then_some((total, started.elapsed().as_secs_f64()))
}

/// `rsync -z --no-whole-file` of `extra` onto a copy of `base` through rsync's remote protocol
/// (a pipe "remote shell"), returning the bytes the sender reported sending.
fn rsync_baseline(base: &Path, extra: &Path, scratch: &Path) -> Option<(u64, f64)> {
    let destination = scratch.join("rsync-destination");
    std::fs::create_dir_all(&destination).ok()?;
    let basis = destination.join("extra.raw");
    let copied = Command::new("cp")
        .arg("--sparse=always")
        .arg(base)
        .arg(&basis)
        .status()
        .ok()?;
    if !copied.success() {
        return None;
    }
    let shell = scratch.join("pipe-shell.sh");
    std::fs::write(
        &shell,
        "#!/bin/sh\n# rsync calls: <shell> <host> <remote command...>\nshift\nexec \"$@\"\n",
    )
    .ok()?;
    Command::new("chmod").arg("+x").arg(&shell).status().ok()?;
    let started = Instant::now();
    let output = Command::new("rsync")
        .args(["-z", "--no-whole-file", "--inplace", "--stats", "-e"])
        .arg(&shell)
        .arg(extra)
        .arg(format!("pipe:{}", basis.display()))
        .output()
        .ok()?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&basis);
    if !output.status.success() {
        eprintln!("rsync failed: {}", String::from_utf8_lossy(&output.stderr));
        return None;
    }
    let stats = String::from_utf8_lossy(&output.stdout);
    let sent = stats
        .lines()
        .find_map(|line| line.strip_prefix("Total bytes sent: "))?
        .replace(',', "")
        .trim()
        .parse()
        .ok()?;
    Some((sent, seconds))
}

fn disk_part(level: i32, link_mbit: f64) {
    let directory = environment("CODEC_BENCH_IMAGES")
        .map_or_else(|| workspace_root().join(".cache/codec"), PathBuf::from);
    let base = directory.join("base.raw");
    let extra = directory.join("extra.raw");
    if !base.exists() || !extra.exists() {
        println!(
            "\n(disk part skipped: {} or {} missing; run bench/codec/make-debian-images.sh)",
            base.display(),
            extra.display()
        );
        return;
    }
    let raw_length = std::fs::metadata(&extra).unwrap().len();
    let scratch = tempfile::Builder::new()
        .prefix("codec-bench-")
        .tempdir_in(&directory)
        .unwrap();

    // The destination: a chunk store holding the base image.
    let store = ChunkStore::open(scratch.path().join("store")).unwrap();
    let started = Instant::now();
    let summary = store
        .put_image(
            "base",
            BufReader::with_capacity(8 << 20, File::open(&base).unwrap()),
        )
        .unwrap();
    let index_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "indexed base: {} chunks, {} MiB stored, {} aligned blocks in {:.1} s",
        summary.chunks,
        summary.new_bytes >> 20,
        summary.indexed_blocks,
        index_seconds
    );

    // A guest's RAM against a destination that holds the disk image: page-cache pages holding
    // file contents are found through the store's 4 KiB-aligned index (DESIGN.md 2.5).
    if let Some(path) = environment("CODEC_BENCH_RAM_IMAGE") {
        let mut image = Vec::new();
        File::open(&path)
            .and_then(|mut file| file.read_to_end(&mut image))
            .expect("reading CODEC_BENCH_RAM_IMAGE");
        image.truncate(image.len() / PAGE_SIZE * PAGE_SIZE);
        for (name, remote) in [("no store", None), ("store holds base.raw", Some(&store))] {
            let mut encoder = PageEncoder::new(
                PageEncoderConfig {
                    zstd_level: level,
                    query_destination: remote.is_some(),
                    ..Default::default()
                },
                &store,
            )
            .unwrap();
            let mut frame = Vec::new();
            let ((), seconds, cpu_seconds) =
                timed(|| send_pages(&mut encoder, "pc.ram", &image, &mut frame));
            let stats = encoder.stats();
            println!(
                "\nRAM image {path} ({name}, zstd {level}): {} bytes → {} on the wire ({:.1}×), {:.2} GB/s per core ({:.2} elapsed); {}",
                image.len(),
                stats.frame_bytes,
                image.len() as f64 / stats.frame_bytes.max(1) as f64,
                gigabytes_per_second(image.len() as u64, cpu_seconds),
                gigabytes_per_second(image.len() as u64, seconds),
                tiers(stats)
            );
        }
    }

    // Send the second image.
    let mut encoder = ChunkEncoder::new(
        ChunkEncoderConfig {
            zstd_level: level,
            ..Default::default()
        },
        &store,
    )
    .unwrap();
    let frames_path = scratch.path().join("frames.bin");
    let mut frames_file = std::io::BufWriter::new(File::create(&frames_path).unwrap());
    let mut frame_lengths = Vec::new();
    let started = Instant::now();
    encoder
        .encode_reader(
            BufReader::with_capacity(8 << 20, File::open(&extra).unwrap()),
            |frame| {
                frame_lengths.push(frame.len());
                frames_file.write_all(frame)?;
                Ok(())
            },
        )
        .unwrap();
    let encode_seconds = started.elapsed().as_secs_f64();
    frames_file.flush().unwrap();
    drop(frames_file);
    let stats = encoder.stats().clone();
    let codec_wire = stats.frame_bytes;

    // Receive it into the destination store and check it is byte-identical.
    let output_path = scratch.path().join("received.raw");
    let mut output =
        std::io::BufWriter::with_capacity(8 << 20, File::create(&output_path).unwrap());
    let mut decoder =
        ChunkDecoder::new(ChunkDecoderConfig::default(), StoreRepository::new(&store)).unwrap();
    let mut frames = BufReader::new(File::open(&frames_path).unwrap());
    let started = Instant::now();
    for length in &frame_lengths {
        let mut frame = vec![0u8; *length];
        frames.read_exact(&mut frame).unwrap();
        decoder
            .decode_frame(&frame, |bytes| output.write_all(bytes))
            .unwrap();
    }
    output.flush().unwrap();
    let decode_seconds = started.elapsed().as_secs_f64();
    drop(output);
    let identical = file_hash(&output_path) == file_hash(&extra);
    let _ = std::fs::remove_file(&output_path);
    let _ = std::fs::remove_file(&frames_path);

    let mut rows: Vec<(String, Option<(u64, f64)>)> = vec![(
        format!(
            "NovaCron codec (zstd {level}, destination holds base; decode {:.2} GB/s, output identical: {identical})",
            gigabytes_per_second(raw_length, decode_seconds)
        ),
        Some((codec_wire, encode_seconds)),
    )];
    if !skipped("baselines") {
        rows.push((
            "zstd -3 -T1".to_owned(),
            count_stdout(Command::new("zstd").args(["-3", "-T1", "-c"]).arg(&extra)),
        ));
        rows.push((
            "zstd -19 --long=27 -T1".to_owned(),
            count_stdout(
                Command::new("zstd")
                    .args(["-19", "--long=27", "-T1", "-c"])
                    .arg(&extra),
            ),
        ));
        rows.push((
            "rsync -z --no-whole-file (basis: base)".to_owned(),
            rsync_baseline(&base, &extra, scratch.path()),
        ));
    }

    println!(
        "\n### Disk image pair: send extra.raw ({:.2} GiB raw) to a destination holding base.raw\n",
        raw_length as f64 / (1u64 << 30) as f64
    );
    println!(
        "zstd level {level} chosen for a {link_mbit} Mbit/s link from levels measured on this data.\n"
    );
    println!(
        "| method | bytes on the wire | raw / wire | vs codec | encode s | encode MB/s (raw) |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (method, result) in rows {
        match result {
            Some((wire, seconds)) => println!(
                "| {method} | {wire} | {:.1}× | {:.2}× | {seconds:.1} | {:.0} |",
                raw_length as f64 / wire.max(1) as f64,
                wire as f64 / codec_wire.max(1) as f64,
                raw_length as f64 / seconds.max(1e-9) / 1e6,
            ),
            None => println!("| {method} | failed | | | | |"),
        }
    }
    println!(
        "\nCodec tiers: {} chunks: zero {}, known (destination) {}, known (this transfer) {}, split {} ({} known 4 KiB blocks), literal {}; literal bytes before zstd {} MiB. Base indexing took {:.1} s.",
        stats.chunks,
        stats.zero_chunks,
        stats.known_from_destination,
        stats.known_from_transfer,
        stats.split_chunks,
        stats.known_blocks,
        stats.literal_chunks,
        stats.literal_bytes >> 20,
        index_seconds,
    );
}

/// Picks the level for the link from levels measured on a sample of the disk image if present,
/// else of text-like pages.
fn measured_level(link_mbit: f64) -> (i32, LevelMeter) {
    let mut sample = vec![0u8; 8 << 20];
    let images = environment("CODEC_BENCH_IMAGES")
        .map_or_else(|| workspace_root().join(".cache/codec"), PathBuf::from);
    let mut filled = false;
    if let Ok(mut file) = File::open(images.join("extra.raw")) {
        // Skip the leading superblock area: take 8 MiB from the middle of the used part.
        let mut buffer = vec![0u8; 64 << 20];
        if file.read_exact(&mut buffer).is_ok() {
            let used: Vec<u8> = buffer
                .chunks_exact(PAGE_SIZE)
                .filter(|page| page.iter().any(|&b| b != 0))
                .flatten()
                .copied()
                .collect();
            let wanted = sample.len();
            if used.len() >= wanted {
                sample.copy_from_slice(&used[..wanted]);
                filled = true;
            }
        }
    }
    if !filled {
        text_fill(&mut sample, 3);
    }
    let mut meter = LevelMeter::new();
    meter
        .measure(&sample, &[1, 3, 6, 9, 12, 15, 19], 1 << 20)
        .unwrap();
    let level = meter.choose(link_mbit * 1e6 / 8.0, 1);
    (level, meter)
}

fn main() {
    let link_mbit: f64 = environment("CODEC_BENCH_LINK_MBIT")
        .and_then(|value| value.parse().ok())
        .unwrap_or(100.0);
    let (level, meter) = match environment("CODEC_BENCH_LEVEL").and_then(|value| value.parse().ok())
    {
        Some(level) => (level, LevelMeter::new()),
        None => measured_level(link_mbit),
    };
    println!("## NovaCron codec benchmark\n");
    println!("Levels measured on a sample (one core): ");
    println!("\n| zstd level | MB/s | ratio |\n|---:|---:|---:|");
    for profile in meter.profiles() {
        println!(
            "| {} | {:.0} | {:.2} |",
            profile.level,
            profile.input_bytes_per_second / 1e6,
            profile.compression_ratio
        );
    }
    println!("\nChosen for {link_mbit} Mbit/s: level {level}.");
    if !skipped("ram") {
        let ram_level = environment("CODEC_BENCH_RAM_LEVEL")
            .and_then(|value| value.parse().ok())
            .unwrap_or(3);
        ram_part(ram_level);
    }
    if !skipped("disk") {
        disk_part(level, link_mbit);
    }
}
