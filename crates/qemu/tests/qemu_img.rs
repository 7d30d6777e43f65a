//! `qemu-img` wrapper against real files: overlays on the test guest's disk, non-image files,
//! corrupt images.

mod common;

use novacron_qemu::{ImageError, ImageFormat, QemuImg};

use common::{binaries, guest, run_directory};

#[tokio::test]
async fn overlay_on_the_guest_disk_records_its_backing_file_and_size() {
    let run_dir = run_directory();
    let image = guest().disk;
    let qemu_img = QemuImg::new(&binaries());
    let (base, format) = qemu_img
        .inspect_runnable(&image)
        .await
        .expect("guest disk is runnable");
    assert_eq!(format, ImageFormat::Qcow2);
    assert_eq!(base.virtual_size, 64 * 1024 * 1024);

    let overlay = run_dir.path().join("vm-disk.qcow2");
    let info = qemu_img
        .create_overlay(
            &image,
            ImageFormat::Qcow2,
            &overlay,
            Some(2 * 1024 * 1024 * 1024),
        )
        .await
        .expect("overlay");
    assert_eq!(info.format, "qcow2");
    assert_eq!(info.virtual_size, 2 * 1024 * 1024 * 1024);
    assert_eq!(info.backing_file.as_deref(), Some(image.to_str().unwrap()));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
    let check = qemu_img
        .check(&overlay, ImageFormat::Qcow2)
        .await
        .expect("check");
    assert!(check.is_healthy());

    // Same size as the image when no size is given.
    let same_size = run_dir.path().join("same.qcow2");
    let info = qemu_img
        .create_overlay(&image, ImageFormat::Qcow2, &same_size, None)
        .await
        .expect("overlay");
    assert_eq!(info.virtual_size, base.virtual_size);

    // Never overwrites an existing file.
    let error = qemu_img
        .create_overlay(&image, ImageFormat::Qcow2, &overlay, None)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("already exists"), "{error}");
}

#[tokio::test]
async fn non_image_and_corrupt_files_are_rejected_naming_the_file() {
    let run_dir = run_directory();
    let qemu_img = QemuImg::new(&binaries());

    let text = run_dir.path().join("notes.txt");
    std::fs::write(&text, "this is not a disk image\n").unwrap();
    let error = qemu_img.inspect_runnable(&text).await.unwrap_err();
    assert!(
        matches!(error, ImageError::NotADiskImage { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("notes.txt"), "{error}");

    // qcow2 magic followed by garbage: qemu-img itself refuses it.
    let corrupt = run_dir.path().join("corrupt.qcow2");
    let mut bytes = b"QFI\xfb\x00\x00\x00\x03".to_vec();
    bytes.extend(std::iter::repeat_n(0xff_u8, 4096));
    std::fs::write(&corrupt, bytes).unwrap();
    let error = qemu_img.info(&corrupt).await.unwrap_err();
    match &error {
        ImageError::Rejected {
            operation, message, ..
        } => {
            assert_eq!(*operation, "info");
            assert!(!message.is_empty());
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(error.to_string().contains("corrupt.qcow2"), "{error}");

    let missing = run_dir.path().join("missing.qcow2");
    let error = qemu_img.info(&missing).await.unwrap_err();
    assert!(error.to_string().contains("missing.qcow2"), "{error}");

    // An overlay on a missing backing file fails and leaves no file behind.
    let overlay = run_dir.path().join("overlay.qcow2");
    let error = qemu_img
        .create_overlay(&missing, ImageFormat::Qcow2, &overlay, None)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("overlay.qcow2"), "{error}");
    assert!(!overlay.exists());
}

#[tokio::test]
async fn map_says_where_guest_ranges_are_stored_and_which_are_compressed() {
    let run_dir = run_directory();
    let image = run_dir.path().join("mapped.qcow2");
    let qemu_img = QemuImg::new(&binaries());
    let created = std::process::Command::new(&binaries().img)
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("4M")
        .status()
        .expect("qemu-img create");
    assert!(created.success());
    let io = binaries().img.with_file_name("qemu-io");
    let written = std::process::Command::new(&io)
        .args(["-f", "qcow2"])
        .args(["-c", "write -P 0x11 0 64k", "-c", "write -c -P 0x22 1M 64k"])
        .arg(&image)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("qemu-io");
    assert!(written.success());

    let extents = qemu_img.map(&image, ImageFormat::Qcow2).await.expect("map");
    let data: Vec<_> = extents.iter().filter(|extent| extent.data).collect();
    assert_eq!(data.len(), 2, "{extents:?}");
    assert_eq!((data[0].start, data[0].length), (0, 65536));
    assert!(!data[0].compressed);
    let offset = data[0]
        .offset
        .expect("an uncompressed range has a file offset");
    let bytes = std::fs::read(&image).expect("read image");
    let stored = &bytes[offset as usize..offset as usize + 65536];
    assert!(stored.iter().all(|&byte| byte == 0x11));
    assert_eq!(data[1].start, 1 << 20);
    assert!(data[1].compressed, "{:?}", data[1]);
    assert_eq!(data[1].offset, None);
    let total: u64 = extents.iter().map(|extent| extent.length).sum();
    assert_eq!(total, 4 << 20, "the extents cover the disk");

    let error = qemu_img
        .map(&run_dir.path().join("missing.qcow2"), ImageFormat::Qcow2)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("missing.qcow2"), "{error}");
}
