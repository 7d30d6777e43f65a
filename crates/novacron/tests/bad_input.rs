//! Bad input gets a clear error, the documented exit code, and leaves nothing half-made.

mod common;

use common::TestHost;
use std::process::Command;

fn vm_dirs(host: &TestHost) -> usize {
    std::fs::read_dir(host.data_dir.join("vms"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

#[test]
fn vm_requests_are_validated_and_leave_nothing_behind() {
    let host = TestHost::start();
    host.import_guest_image("img");
    let guest = common::guest();
    let kernel = guest.kernel.to_str().expect("utf-8");

    let error = host.fails(&["vm", "create", "../etc", "--image", "img"], 2);
    assert!(
        error.contains("vm name") && error.contains("'.'"),
        "{error}"
    );
    let error = host.fails(&["vm", "create", "Bad_Name", "--image", "img"], 2);
    assert!(error.contains("lowercase"), "{error}");
    let error = host.fails(
        &[
            "vm", "create", "big", "--image", "img", "--memory", "100TiB",
        ],
        7,
    );
    assert!(
        error.contains("memory") && error.contains("the host has"),
        "{error}"
    );
    let error = host.fails(
        &["vm", "create", "wide", "--image", "img", "--cpus", "4096"],
        7,
    );
    assert!(error.contains("cpus"), "{error}");
    let error = host.fails(
        &[
            "vm",
            "create",
            "x",
            "--image",
            "img",
            "--memory",
            "12parsecs",
        ],
        2,
    );
    assert!(error.contains("invalid size"), "{error}");
    let error = host.fails(&["vm", "create", "x", "--image", "nope"], 4);
    assert!(
        error.contains("nope") && error.contains("image list"),
        "{error}"
    );
    let error = host.fails(
        &["vm", "create", "x", "--kernel", "/nonexistent/vmlinuz"],
        2,
    );
    assert!(error.contains("/nonexistent/vmlinuz"), "{error}");
    let error = host.fails(
        &["vm", "create", "x", "--image", "img", "--disk", "1MiB"],
        2,
    );
    assert!(error.contains("smaller than image"), "{error}");
    let error = host.fails(&["vm", "create", "x"], 2);
    assert!(error.contains("nothing to boot"), "{error}");

    host.ok(&[
        "vm",
        "create",
        "dup",
        "--image",
        "img",
        "--kernel",
        kernel,
        "--no-start",
    ]);
    let error = host.fails(
        &["vm", "create", "dup", "--image", "img", "--kernel", kernel],
        5,
    );
    assert!(error.contains("already exists"), "{error}");
    let error = host.fails(&["vm", "show", "ghost"], 4);
    assert!(error.contains("ghost"), "{error}");
    let error = host.fails(&["vm", "pause", "dup"], 6);
    assert!(error.contains("only a running VM"), "{error}");
    // Alone, a host checks placement constraints against itself: it has no labels, and `dup`
    // is not in a group but `grouped` will be.
    let error = host.fails(
        &[
            "vm",
            "create",
            "x",
            "--kernel",
            kernel,
            "--require-label",
            "zone=a",
        ],
        7,
    );
    assert!(
        error.contains("zone=a") && error.contains("no labels"),
        "{error}"
    );
    host.ok(&[
        "vm",
        "create",
        "grouped",
        "--kernel",
        kernel,
        "--no-start",
        "--anti-affinity",
        "db",
    ]);
    let error = host.fails(
        &[
            "vm",
            "create",
            "x",
            "--kernel",
            kernel,
            "--anti-affinity",
            "db",
        ],
        7,
    );
    assert!(
        error.contains("anti-affinity group db") && error.contains("grouped"),
        "{error}"
    );
    host.ok(&["vm", "delete", "grouped"]);
    let error = host.fails(&["image", "delete", "img"], 6);
    assert!(error.contains("dup"), "image in use names its VM: {error}");

    // Only the one good VM exists, with one directory.
    assert_eq!(host.json(&["vm", "list"]).as_array().map(Vec::len), Some(1));
    assert_eq!(vm_dirs(&host), 1);
}

#[test]
fn image_imports_refuse_non_images_and_bad_names() {
    let host = TestHost::start();
    let scratch = host.directory.path();
    let text = scratch.join("notes.txt");
    std::fs::write(&text, "this is not a disk image\n".repeat(512)).expect("write");
    let error = host.fails(
        &[
            "image",
            "import",
            text.to_str().expect("utf-8"),
            "--name",
            "notes",
        ],
        2,
    );
    assert!(error.contains("not a usable disk image"), "{error}");
    let odd = scratch.join("odd.bin");
    std::fs::write(&odd, vec![7u8; 1000]).expect("write");
    let error = host.fails(
        &[
            "image",
            "import",
            odd.to_str().expect("utf-8"),
            "--name",
            "odd",
        ],
        2,
    );
    assert!(error.contains("not a usable disk image"), "{error}");
    // A qcow2 that points at a host file must never be imported.
    let sneaky = scratch.join("sneaky.qcow2");
    let status = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "/etc/hostname",
        ])
        .arg(&sneaky)
        .arg("1M")
        .status()
        .expect("qemu-img");
    assert!(status.success());
    let error = host.fails(
        &[
            "image",
            "import",
            sneaky.to_str().expect("utf-8"),
            "--name",
            "sneaky",
        ],
        2,
    );
    assert!(error.contains("backing file"), "{error}");
    // A qcow2 whose L1 table points past the end of the file is corrupt.
    let guest = common::guest();
    let corrupt = scratch.join("corrupt.qcow2");
    let mut bytes = std::fs::read(&guest.disk).expect("guest disk");
    bytes[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(&corrupt, &bytes).expect("write");
    let error = host.fails(
        &[
            "image",
            "import",
            corrupt.to_str().expect("utf-8"),
            "--name",
            "corrupt",
        ],
        2,
    );
    assert!(error.contains("not a usable disk image"), "{error}");
    let error = host.fails(
        &[
            "image",
            "import",
            guest.disk.to_str().expect("utf-8"),
            "--name",
            "../up",
        ],
        2,
    );
    assert!(error.contains("image name"), "{error}");
    host.fails(&["image", "import", "/nonexistent.qcow2"], 2);

    host.import_guest_image("good");
    let error = host.fails(
        &[
            "image",
            "import",
            guest.disk.to_str().expect("utf-8"),
            "--name",
            "good",
        ],
        5,
    );
    assert!(error.contains("already exists"), "{error}");
    // Same content under another name is the same image.
    host.fails(
        &[
            "image",
            "import",
            guest.disk.to_str().expect("utf-8"),
            "--name",
            "again",
        ],
        5,
    );

    let images = host.json(&["image", "list"]);
    assert_eq!(images.as_array().map(Vec::len), Some(1));
    let id = images[0]["id"].as_str().expect("id");
    let expected = [format!("{id}.pages"), format!("{id}.qcow2")];
    // The page index is built after the import answered.
    let files = common::poll(
        "the image's page index beside it",
        std::time::Duration::from_secs(60),
        || {
            let mut files: Vec<String> = std::fs::read_dir(host.data_dir.join("images"))
                .expect("images")
                .map(|entry| {
                    entry
                        .expect("entry")
                        .file_name()
                        .to_string_lossy()
                        .into_owned()
                })
                .filter(|name| !name.ends_with(".tmp"))
                .collect();
            files.sort();
            files.contains(&expected[0]).then_some(files)
        },
    );
    assert_eq!(
        files, expected,
        "refused imports left no file: the one image and its page index"
    );
    let staging: Vec<_> = std::fs::read_dir(host.data_dir.join("staging"))
        .expect("staging")
        .collect();
    assert!(staging.is_empty(), "no upload leftovers");
}

#[test]
fn tokens_are_required_and_checked() {
    let host = TestHost::start();
    assert_eq!(
        common::http_get_status(&format!("{}/api/v1/health", host.server())),
        Some(200)
    );
    assert_eq!(
        common::http_get_status(&format!("{}/api/v1/vms", host.server())),
        Some(401)
    );
    let token_file = host.data_dir.join("admin.token");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).expect("token").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let output = Command::new(common::BINARY)
        .args(["vm", "list"])
        .env("NOVACRON_SERVER", host.server())
        .env("NOVACRON_TOKEN", "wrong")
        .output()
        .expect("cli");
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("bearer token"));
    let output = Command::new(common::BINARY)
        .args(["vm", "list"])
        .env("NOVACRON_SERVER", host.server())
        .env("NOVACRON_DATA_DIR", host.directory.path().join("elsewhere"))
        .output()
        .expect("cli");
    assert_eq!(output.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&output.stderr).contains("no token was found"));
}

#[test]
fn serve_refuses_a_busy_port_and_a_data_directory_in_use() {
    let host = TestHost::start();
    // Same data directory, other port: the lock refuses it.
    let other_port = common::free_port();
    let output = Command::new(common::BINARY)
        .args(["serve", "--listen", &format!("127.0.0.1:{other_port}")])
        .env("NOVACRON_DATA_DIR", &host.data_dir)
        .output()
        .expect("serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("in use by another `novacron serve`"),
        "{stderr}"
    );
    // Other data directory, same port.
    let output = Command::new(common::BINARY)
        .args(["serve", "--listen", &format!("127.0.0.1:{}", host.port)])
        .env("NOVACRON_DATA_DIR", host.directory.path().join("second"))
        .output()
        .expect("serve");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already in use"), "{stderr}");
    // The first host is unharmed.
    host.ok(&["vm", "list"]);
}

#[test]
fn a_missing_qemu_binary_is_named_with_its_package() {
    let mut host = TestHost::new();
    host.extra_args = vec!["--qemu".into(), "/nonexistent/qemu-system-x86_64".into()];
    host.spawn_serve();
    let guest = common::guest();
    let error = host.fails(
        &[
            "vm",
            "create",
            "x",
            "--kernel",
            guest.kernel.to_str().expect("utf-8"),
        ],
        8,
    );
    assert!(
        error.contains("qemu-system-x86"),
        "names the Debian package: {error}"
    );
    assert_eq!(host.json(&["vm", "list"]).as_array().map(Vec::len), Some(0));
}

#[test]
fn a_full_disk_while_creating_a_disk_is_reported_and_undone() {
    // A small tmpfs as the data directory, filled up after the image import.
    let mut host = TestHost::new();
    std::fs::create_dir_all(&host.data_dir).expect("data dir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=100m", "tmpfs"])
        .arg(&host.data_dir)
        .status()
        .expect("mount");
    assert!(mounted.success(), "mounting a tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(host.data_dir.clone());
    host.spawn_serve();
    host.import_guest_image("img");
    let filler = host.data_dir.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=128"])
        .arg(format!("of={}", filler.display()))
        .output();
    let guest = common::guest();
    let error = host.fails(
        &[
            "vm",
            "create",
            "x",
            "--image",
            "img",
            "--kernel",
            guest.kernel.to_str().expect("utf-8"),
        ],
        7,
    );
    assert!(error.contains("not enough disk space"), "{error}");
    assert_eq!(
        host.json(&["vm", "list"]).as_array().map(Vec::len),
        Some(0),
        "no record left"
    );
    assert_eq!(vm_dirs(&host), 0, "no vm directory left");
    let _ = std::fs::remove_file(&filler);
    host.kill_serve();
}

/// `serve --shared-storage NAME=PATH` is checked before the host starts; a VM created with
/// `--storage NAME` keeps its disk on that storage (the base image copied beside it, named
/// relative to the overlay); a storage the host does not mount, or one for a VM without a
/// disk, is refused and leaves nothing; deleting the VM and then the image empties the storage.
#[test]
fn shared_storage_is_checked_at_start_and_holds_the_disks_of_vms_on_it() {
    let host = TestHost::new();
    let serve_with = |argument: &str| {
        Command::new(common::BINARY)
            .args(["serve", "--listen", &format!("127.0.0.1:{}", host.port)])
            .args(["--shared-storage", argument])
            .env("NOVACRON_DATA_DIR", &host.data_dir)
            .output()
            .expect("serve")
    };
    for (argument, expected) in [
        ("pool", "is not NAME=PATH"),
        ("Pool=/tmp", "shared storage"),
        ("pool=relative/dir", "must be absolute"),
        ("pool=/nonexistent/novacron-pool", "cannot be used"),
    ] {
        let output = serve_with(argument);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{argument}: {stderr}");
        assert!(stderr.contains(expected), "{argument}: {stderr}");
    }

    let pool = host.directory.path().join("pool");
    std::fs::create_dir(&pool).expect("the storage directory");
    let mut host = host;
    host.extra_args = vec![
        "--shared-storage".into(),
        format!("pool={}", pool.display()),
    ];
    host.spawn_serve();
    host.import_guest_image("img");
    let guest = common::guest();
    let kernel = guest.kernel.to_str().expect("utf-8");
    let error = host.fails(
        &[
            "vm",
            "create",
            "x",
            "--image",
            "img",
            "--storage",
            "other",
            "--no-start",
        ],
        6,
    );
    assert!(
        error.contains("does not mount shared storage \"other\""),
        "{error}"
    );
    let error = host.fails(
        &["vm", "create", "x", "--kernel", kernel, "--storage", "pool"],
        2,
    );
    assert!(error.contains("has none"), "{error}");
    assert_eq!(vm_dirs(&host), 0);

    let vm = host.create_guest_vm("pooled", "img", &["--storage", "pool", "--no-start"]);
    let uuid = vm["uuid"].as_str().expect("uuid").replace('-', "");
    let overlay = pool.join("vms").join(&uuid).join("disk.qcow2");
    assert!(overlay.exists(), "the disk is on the storage");
    assert!(
        !host
            .data_dir
            .join("vms")
            .join(&uuid)
            .join("disk.qcow2")
            .exists()
    );
    let images: Vec<_> = std::fs::read_dir(pool.join("images"))
        .expect("the storage's images")
        .map(|entry| entry.expect("entry").file_name())
        .collect();
    assert_eq!(images.len(), 1, "the base image copied there: {images:?}");
    let shown = host.ok(&["vm", "show", "pooled"]);
    assert!(shown.contains("shared storage pool"), "{shown}");
    // It boots from there.
    host.ok(&["vm", "start", "pooled"]);
    host.wait_for_state("pooled", "running");

    host.ok(&["vm", "delete", "pooled", "--force"]);
    common::poll(
        "the vm's disk removed from the storage",
        std::time::Duration::from_secs(60),
        || (!pool.join("vms").join(&uuid).exists()).then_some(()),
    );
    host.ok(&["image", "delete", "img"]);
    let left = std::fs::read_dir(pool.join("images"))
        .expect("the storage's images")
        .count();
    assert_eq!(left, 0, "the image's copy on the storage removed");
}
