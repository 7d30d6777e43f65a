//! Test harness: a real `novacron serve` process on a temporary data directory and a free port,
//! driven through the real `novacron` CLI, booting the real test guest under QEMU.

#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_novacron");

/// The test guest built by `scripts/build-guest`.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
}

pub fn guest() -> Guest {
    let directory = std::env::var_os("NOVACRON_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("novacron/guest")
        });
    let guest = Guest {
        kernel: directory.join("vmlinuz"),
        initrd: directory.join("initrd.img"),
        disk: directory.join("disk.qcow2"),
    };
    assert!(
        guest.kernel.exists() && guest.initrd.exists() && guest.disk.exists(),
        "the test guest is missing in {}: run scripts/build-guest first",
        directory.display()
    );
    guest
}

/// Polls `condition` until it returns `Some` or the deadline passes.
pub fn poll<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

pub struct TestHost {
    pub directory: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub port: u16,
    pub serve: Option<Child>,
    pub extra_env: Vec<(String, String)>,
    pub extra_args: Vec<String>,
    /// Port of the DWCP transfer listener (`serve --transfer-listen`).
    pub transfer_port: u16,
    /// Address the API and the transfer listener bind to.
    pub bind_ip: String,
    /// Network namespace `serve` and the CLI run in (`ip netns exec`), if any.
    pub namespace: Option<String>,
}

/// A port no other test process holds and the kernel does not hand out on its own.
///
/// A port taken by binding port 0 lies in the kernel's ephemeral range, where any outgoing
/// connection (curl, a DWCP stream, QEMU's migration) may take it before `serve` binds it. So
/// ports come from below that range (20000–32767), and each is reserved for the life of the
/// test process by an advisory lock on a file in `/tmp/novacron-test-ports`, so tests running
/// in parallel processes never pick the same one.
pub fn free_port() -> u16 {
    use rand::Rng;
    static RESERVED: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let directory = Path::new("/tmp/novacron-test-ports");
    std::fs::create_dir_all(directory).expect("create the port reservation directory");
    let mut random = rand::rng();
    for _ in 0..10_000 {
        let port: u16 = random.random_range(20_000..32_768);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(directory.join(format!("{port}.lock")))
            .expect("open a port reservation file");
        if lock.try_lock().is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("0.0.0.0", port)).is_err() {
            continue;
        }
        RESERVED.lock().expect("reserved ports").push(lock);
        return port;
    }
    panic!("no free port between 20000 and 32767 after 10000 tries");
}

impl TestHost {
    /// The host's name (`serve --host-name`), or "" when it was started without one.
    pub fn name(&self) -> &str {
        self.extra_args
            .iter()
            .position(|argument| argument == "--host-name")
            .and_then(|index| self.extra_args.get(index + 1))
            .map_or("", String::as_str)
    }

    pub fn new() -> Self {
        let directory = tempfile::Builder::new()
            .prefix("nc")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let data_dir = directory.path().join("d");
        Self {
            data_dir,
            directory,
            port: free_port(),
            serve: None,
            extra_env: Vec::new(),
            extra_args: Vec::new(),
            transfer_port: free_port(),
            bind_ip: "127.0.0.1".into(),
            namespace: None,
        }
    }

    /// A host whose `serve` and CLI run inside network namespace `namespace`, bound to `ip`.
    pub fn in_namespace(namespace: &str, ip: &str) -> Self {
        let mut host = Self::new();
        host.namespace = Some(namespace.to_string());
        host.bind_ip = ip.to_string();
        host
    }

    /// The transfer address peers push to and pull from.
    pub fn transfer_address(&self) -> String {
        format!("{}:{}", self.bind_ip, self.transfer_port)
    }

    /// The value of Prometheus metric `name` (a line `name value`) in this host's `/metrics`,
    /// if it is exported.
    pub fn metric(&self, name: &str) -> Option<f64> {
        let token = std::fs::read_to_string(self.data_dir.join("admin.token")).ok()?;
        let output = self
            .command("curl")
            .args([
                "-s",
                "-H",
                &format!("Authorization: Bearer {}", token.trim()),
                &format!("{}/metrics", self.server()),
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// A command for `program`, inside this host's namespace if it has one.
    pub fn command(&self, program: &str) -> Command {
        match &self.namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace, program]);
                command
            }
            None => Command::new(program),
        }
    }

    pub fn start() -> Self {
        let mut host = Self::new();
        host.spawn_serve();
        host
    }

    pub fn server(&self) -> String {
        format!("http://{}:{}", self.bind_ip, self.port)
    }

    /// Starts `serve` and waits until its API answers.
    pub fn spawn_serve(&mut self) {
        self.spawn_serve_without_waiting();
        let url = format!("{}/api/v1/health", self.server());
        poll("the API to answer", Duration::from_secs(30), || {
            if let Some(child) = self.serve.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "novacron serve exited with {status}; log:\n{}",
                    self.serve_log()
                );
            }
            http_get_status_with(self.command("curl"), &url).filter(|status| *status == 200)
        });
    }

    /// Starts `serve` and returns at once.
    pub fn spawn_serve_without_waiting(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.directory.path().join("serve.log"))
            .expect("serve log");
        let mut command = self.command(BINARY);
        command
            .args([
                "serve",
                "--listen",
                &format!("{}:{}", self.bind_ip, self.port),
            ])
            .args(["--transfer-listen", &self.transfer_address()])
            .args(&self.extra_args)
            .env("NOVACRON_DATA_DIR", &self.data_dir)
            .env("NOVACRON_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        for (key, value) in &self.extra_env {
            command.env(key, value);
        }
        self.serve = Some(command.spawn().expect("spawn novacron serve"));
    }

    /// `serve`'s log as written (with the terminal colours of its fields; see
    /// [`without_colours`]).
    pub fn serve_log(&self) -> String {
        std::fs::read_to_string(self.directory.path().join("serve.log")).unwrap_or_default()
    }

    /// `kill -9` of `serve` (QEMU processes are not its children and keep running).
    /// Stops `serve` the way an operator's service manager does (SIGTERM, a clean shutdown)
    /// and waits for it to exit.
    pub fn stop_serve(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            poll(
                "serve to exit after SIGTERM",
                Duration::from_secs(30),
                || child.try_wait().ok().flatten().map(|_| ()),
            );
        }
    }

    pub fn kill_serve(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs the CLI against this host.
    pub fn cli(&self, arguments: &[&str]) -> Output {
        self.command(BINARY)
            .args(arguments)
            .env("NOVACRON_SERVER", self.server())
            .env("NOVACRON_DATA_DIR", &self.data_dir)
            .env_remove("NOVACRON_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("run the novacron cli")
    }

    /// Runs the CLI, asserts success and returns stdout.
    pub fn ok(&self, arguments: &[&str]) -> String {
        let output = self.cli(arguments);
        assert!(
            output.status.success(),
            "novacron {arguments:?} failed ({}):\nstdout: {}\nstderr: {}\nserve log tail:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            tail(&self.serve_log(), 3000)
        );
        String::from_utf8_lossy(&output.stdout).to_string()
    }

    /// Runs the CLI, asserts it failed with `exit_code` and returns stderr.
    pub fn fails(&self, arguments: &[&str], exit_code: i32) -> String {
        let output = self.cli(arguments);
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert_eq!(
            output.status.code(),
            Some(exit_code),
            "novacron {arguments:?}: expected exit {exit_code}, got {}; stderr: {stderr}",
            output.status
        );
        stderr
    }

    pub fn json(&self, arguments: &[&str]) -> Value {
        let mut all: Vec<&str> = arguments.to_vec();
        all.extend(["--output", "json"]);
        let stdout = self.ok(&all);
        serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("not json ({error}): {stdout}"))
    }

    pub fn vm(&self, name: &str) -> Value {
        self.json(&["vm", "show", name])
    }

    pub fn import_guest_image(&self, name: &str) {
        let guest = guest();
        self.ok(&[
            "image",
            "import",
            guest.disk.to_str().expect("utf-8 path"),
            "--name",
            name,
        ]);
    }

    /// The `vm create` arguments that boot the test guest's kernel with `image` as its disk.
    pub fn guest_vm_arguments(name: &str, image: &str) -> Vec<String> {
        let guest = guest();
        let path = |path: &Path| path.to_str().expect("utf-8 path").to_string();
        let mut arguments: Vec<String> =
            ["vm", "create", name, "--image", image, "--memory", "256MiB"]
                .iter()
                .map(|argument| argument.to_string())
                .collect();
        arguments.extend([
            "--kernel".into(),
            path(&guest.kernel),
            "--initrd".into(),
            path(&guest.initrd),
        ]);
        arguments.extend(["--cmdline".into(), "console=ttyS0 panic=-1".into()]);
        arguments
    }

    /// Creates a VM booting the test guest's kernel with the image as its disk.
    pub fn create_guest_vm(&self, name: &str, image: &str, extra: &[&str]) -> Value {
        let owned = Self::guest_vm_arguments(name, image);
        let mut arguments: Vec<&str> = owned.iter().map(String::as_str).collect();
        arguments.extend_from_slice(extra);
        arguments.extend(["--output", "json"]);
        let stdout = self.ok(&arguments);
        serde_json::from_str(&stdout).expect("vm json")
    }

    pub fn serial_log(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.cli(&["vm", "logs", name]).stdout).to_string()
    }

    pub fn wait_for_console(&self, name: &str, needle: &str) {
        poll(
            &format!("{needle:?} on the console of {name}"),
            Duration::from_secs(90),
            || self.serial_log(name).contains(needle).then_some(()),
        );
    }

    pub fn wait_for_state(&self, name: &str, state: &str) -> Value {
        poll(
            &format!("vm {name} to be {state}"),
            Duration::from_secs(90),
            || {
                let vm = self.vm(name);
                (vm["status"]["state"] == state).then_some(vm)
            },
        )
    }

    pub fn vm_directory(&self, uuid: &str) -> PathBuf {
        self.data_dir.join("vms").join(uuid.replace('-', ""))
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.kill_serve();
        if std::thread::panicking() {
            // A failed test leaves the host's log behind, and its end on stderr, to say why.
            let log = self.serve_log();
            let kept = std::env::temp_dir().join(format!(
                "novacron-failed-{}-{}.log",
                self.name(),
                std::process::id()
            ));
            let _ = std::fs::write(&kept, &log);
            eprintln!(
                "--- end of {}'s serve log (whole log kept in {}) ---\n{}",
                self.name(),
                kept.display(),
                tail(&log, 6000)
            );
        }
        // Never leave a QEMU behind: kill every one whose pid file is in this data directory.
        if let Ok(entries) = std::fs::read_dir(self.data_dir.join("vms")) {
            for entry in entries.flatten() {
                if let Ok(pid) = std::fs::read_to_string(entry.path().join("qemu.pid")) {
                    let _ = Command::new("kill").args(["-9", pid.trim()]).status();
                }
            }
        }
    }
}

pub fn tail(text: &str, bytes: usize) -> &str {
    let start = text.len().saturating_sub(bytes);
    let start = (start..text.len())
        .find(|index| text.is_char_boundary(*index))
        .unwrap_or(text.len());
    &text[start..]
}

/// Status code of a plain GET (no token), or `None` when nothing answers.
pub fn http_get_status(url: &str) -> Option<u16> {
    http_get_status_with(Command::new("curl"), url)
}

/// [`http_get_status`] with a prepared `curl` command (in a namespace, say).
pub fn http_get_status_with(mut curl: Command, url: &str) -> Option<u16> {
    let output = curl
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url])
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|code| *code != 0)
}

pub fn process_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| !stat.contains(") Z "))
            .unwrap_or(false)
}

/// The last workload tick on a console log (`NOVACRON-WORKLOAD tick=N ... errors=E`), with its
/// error count.
pub fn last_workload_tick(log: &str) -> Option<(u64, u64)> {
    log.lines().rev().find_map(|line| {
        let start = line.find("NOVACRON-WORKLOAD tick=")?;
        let field = |name: &str| -> Option<u64> {
            line[start..]
                .split(' ')
                .find_map(|part| part.strip_prefix(name))?
                .trim()
                .parse()
                .ok()
        };
        Some((field("tick=")?, field("errors=")?))
    })
}

/// `line` without ANSI colour sequences (`ESC [ ... m`), as tracing writes around fields.
pub fn without_colours(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut characters = line.chars();
    while let Some(character) = characters.next() {
        if character == '\u{1b}' {
            for inner in characters.by_ref() {
                if inner.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(character);
        }
    }
    plain
}
