//! The page index of a qcow2 image built from the image file itself (through `qemu-img map`)
//! agrees with one built from a raw copy, and survives a save and load: every non-zero 4 KiB
//! block of the guest-visible disk is found and read back from the qcow2 file.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use novacron_codec::{ContentHash, LocalContentSource, PAGE_SIZE, is_zero};
use novacron_migration::{ImagePageIndex, StoredRange};
use novacron_qemu::{ImageFormat, QemuImg};

#[tokio::test]
async fn a_qcow2_index_from_its_map_matches_a_raw_copy_and_survives_saving() {
    let qcow2 = guest().disk;
    let dir = tempfile::tempdir().expect("tempdir");
    let qemu_img = QemuImg::new(&binaries());
    let info = qemu_img.info(&qcow2).await.expect("info");
    let ranges: Vec<StoredRange> = qemu_img
        .map(&qcow2, ImageFormat::Qcow2)
        .await
        .expect("map")
        .into_iter()
        .filter(|extent| extent.data)
        .map(|extent| StoredRange {
            guest_offset: extent.start,
            file_offset: extent
                .offset
                .expect("the test guest's disk is not compressed"),
            length: extent.length,
        })
        .collect();
    assert!(!ranges.is_empty());
    let from_map =
        ImagePageIndex::build_from_ranges(&qcow2, &ranges, info.virtual_size).expect("index");
    let saved = dir.path().join("disk.pages");
    from_map.save(&saved).expect("save");
    let loaded = ImagePageIndex::load(&saved, &qcow2).expect("load");

    let raw = dir.path().join("disk.raw");
    qemu_img
        .convert_to_raw(&qcow2, ImageFormat::Qcow2, &raw)
        .await
        .expect("convert");
    let from_raw = ImagePageIndex::build(&raw).expect("raw index");
    assert_eq!(from_map.blocks(), from_raw.blocks());
    assert_eq!(from_map.distinct_blocks(), from_raw.distinct_blocks());
    assert_eq!(loaded.distinct_blocks(), from_raw.distinct_blocks());
    assert!(from_raw.distinct_blocks() > 1000, "{from_raw:?}");

    let file = std::fs::File::open(&raw).expect("open raw");
    let mut block = vec![0u8; PAGE_SIZE];
    let mut checked = 0;
    for number in 0..from_raw.blocks() {
        file.read_exact_at(&mut block, number * PAGE_SIZE as u64)
            .expect("read raw");
        if is_zero(&block) {
            continue;
        }
        let hash = ContentHash::of(&block);
        for index in [&from_map, &loaded] {
            let content = index.content(&hash).expect("read back");
            assert_eq!(content.as_deref(), Some(&block[..]), "block {number}");
        }
        checked += 1;
    }
    assert!(checked >= from_raw.distinct_blocks());
}
