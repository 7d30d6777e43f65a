//! A QMP monitor connection that outlives the process which uses it.
//!
//! Out-of-band commands (`migrate-recover`) are answered while QEMU's main loop is stuck, but
//! only on a connection that negotiated the `oob` capability, and that negotiation is an
//! in-band command. A destination QEMU whose post-copy paused can be stuck for good: under
//! TCG a vCPU delivering an interrupt holds QEMU's main lock while it waits for a page that
//! has not arrived (seen with gdb on QEMU 10.0). A `serve` started after the one that drove the
//! migration could then never talk to it. So a small holder process (`novacron qmp-hold`)
//! connects to a second monitor of such a QEMU while it still answers, negotiates `oob`, and
//! keeps the connection open without reading from it; any later process takes a copy of the
//! connection with `pidfd_getfd` ([`HeldMonitor::execute_oob`]). The holder exits when QEMU
//! closes the connection, and is killed when the migration no longer needs it
//! ([`HeldMonitor::release`]).

use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Longest line the holder reads while it negotiates.
const MAX_LINE: usize = 64 << 10;

/// The file, beside the monitor's socket, where a holder says which process and descriptor hold
/// the connection (`PID FD START`, START the process's start time, against pid reuse).
pub fn holder_record(socket: &Path) -> PathBuf {
    socket.with_extension("held")
}

/// The holder: connects to the QMP monitor at `socket`, negotiates the `oob` capability, writes
/// [`holder_record`], and waits, never reading, until QEMU closes the connection.
pub fn hold(socket: &Path) -> std::io::Result<()> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let greeting = read_line(&mut stream)?;
    if !greeting.contains("\"QMP\"") || !greeting.contains("\"oob\"") {
        return Err(std::io::Error::other(format!(
            "{} is not a QMP monitor that runs out-of-band commands: {greeting}",
            socket.display()
        )));
    }
    stream.write_all(
        b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}, \"id\": \"hold\"}\n",
    )?;
    loop {
        // Events may come first; nothing else does on a new connection.
        let line = read_line(&mut stream)?;
        let reply: Value = serde_json::from_str(&line)
            .map_err(|error| std::io::Error::other(format!("monitor said {line:?}: {error}")))?;
        if reply["id"] == "hold" {
            if reply.get("return").is_none() {
                return Err(std::io::Error::other(format!(
                    "qmp_capabilities refused: {line}"
                )));
            }
            break;
        }
    }
    let record = holder_record(socket);
    let partial = record.with_extension("held.partial");
    let pid = std::process::id();
    let start = process_start_time(pid)
        .ok_or_else(|| std::io::Error::other("cannot read this process's start time"))?;
    std::fs::write(&partial, format!("{pid} {} {start}\n", stream.as_raw_fd()))?;
    std::fs::rename(&partial, &record)?;
    // Until QEMU hangs up: whatever it sends stays unread, for the process that takes a copy.
    loop {
        let mut fds = [rustix::event::PollFd::new(
            &stream,
            rustix::event::PollFlags::RDHUP,
        )];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {
                let events = fds[0].revents();
                if events.intersects(
                    rustix::event::PollFlags::RDHUP
                        | rustix::event::PollFlags::HUP
                        | rustix::event::PollFlags::ERR,
                ) {
                    return Ok(());
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
}

/// Reads one line byte by byte (so nothing after it is taken from the socket).
fn read_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the monitor closed the connection",
            ));
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).trim().to_string());
        }
        line.push(byte[0]);
        if line.len() > MAX_LINE {
            return Err(std::io::Error::other("a monitor line beyond 64 KiB"));
        }
    }
}

/// When process `pid` started (clock ticks after boot, `/proc/PID/stat` field 22).
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// A connection a holder keeps (read from its [`holder_record`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldMonitor {
    pub holder_pid: u32,
    pub fd: i32,
    /// The holder's start time, which a process reusing its pid does not have.
    pub holder_start: u64,
}

impl HeldMonitor {
    /// The holder of the monitor at `socket`, if its record is there and the holder still
    /// runs.
    pub fn find(socket: &Path) -> Option<HeldMonitor> {
        let text = std::fs::read_to_string(holder_record(socket)).ok()?;
        let mut words = text.split_whitespace();
        let held = HeldMonitor {
            holder_pid: words.next()?.parse().ok()?,
            fd: words.next()?.parse().ok()?,
            holder_start: words.next()?.parse().ok()?,
        };
        held.is_running().then_some(held)
    }

    fn is_running(&self) -> bool {
        process_start_time(self.holder_pid) == Some(self.holder_start)
    }

    fn take_copy(&self) -> std::io::Result<OwnedFd> {
        let pid = rustix::process::Pid::from_raw(self.holder_pid as i32)
            .ok_or_else(|| std::io::Error::other("holder pid 0"))?;
        let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
        // The pidfd pins the process: check it is still the holder (pid reuse).
        if !self.is_running() {
            return Err(std::io::Error::other("the monitor's holder has exited"));
        }
        Ok(rustix::process::pidfd_getfd(
            pidfd.as_fd(),
            self.fd,
            rustix::process::PidfdGetfdFlags::empty(),
        )?)
    }

    /// Runs `command` out of band on the held connection and returns its `return` value.
    /// Whatever QEMU said earlier on the connection (events, answers to others) is skipped.
    pub async fn execute_oob(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> std::io::Result<Value> {
        let stream = UnixStream::from(self.take_copy()?);
        stream.set_nonblocking(true)?;
        let mut stream = tokio::net::UnixStream::from_std(stream)?;
        let id = format!("{command}-{}", uuid::Uuid::new_v4().simple());
        let mut request = json!({ "exec-oob": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let (read_half, mut write_half) = stream.split();
        write_half
            .write_all(format!("{request}\n").as_bytes())
            .await?;
        let mut lines = BufReader::new(read_half).lines();
        let answer = async {
            while let Some(line) = lines.next_line().await? {
                // A line cut by an earlier reader does not parse, and is skipped too.
                let Ok(reply) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if reply["id"] != id.as_str() {
                    continue;
                }
                return match (reply.get("return"), reply.get("error")) {
                    (Some(value), _) => Ok(value.clone()),
                    (None, Some(error)) => Err(std::io::Error::other(format!(
                        "{command}: {}",
                        error["desc"].as_str().unwrap_or("refused")
                    ))),
                    (None, None) => Err(std::io::Error::other(format!("{command}: {line}"))),
                };
            }
            Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the monitor closed the connection",
            ))
        };
        tokio::time::timeout(timeout, answer).await.map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("{command}: no answer within {} s", timeout.as_secs()),
            )
        })?
    }

    /// Ends the holder (the connection closes once nobody else holds a copy).
    pub fn release(&self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.holder_pid as i32)
            && let Ok(pidfd) =
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
            && self.is_running()
        {
            let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    /// A monitor that greets with `oob`, answers the holder's negotiation after an event, then
    /// answers one out-of-band command (after a stale answer and a cut line, which the taker
    /// skips), and hangs up when told.
    fn fake_monitor(
        listener: std::os::unix::net::UnixListener,
        hang_up: std::sync::mpsc::Receiver<()>,
    ) {
        let (mut stream, _) = listener.accept().unwrap();
        stream
            .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\n")
            .unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let request: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(request["arguments"]["enable"], json!(["oob"]));
        stream
            .write_all(b"{\"event\": \"RESUME\"}\n{\"return\": {}, \"id\": \"hold\"}\n")
            .unwrap();
        // Left unread by the holder: an event, another client's answer, a cut line.
        stream
            .write_all(b"{\"event\": \"STOP\"}\n{\"return\": {}, \"id\": \"other\"}\n{\"ret")
            .unwrap();
        line.clear();
        reader.read_line(&mut line).unwrap();
        let request: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(request["exec-oob"], "migrate-recover");
        let answer = json!({ "return": { "ok": true }, "id": request["id"] });
        stream
            .write_all(format!("\n{answer}\n").as_bytes())
            .unwrap();
        let _ = hang_up.recv();
    }

    #[tokio::test]
    async fn a_held_connection_answers_a_later_taker_and_the_holder_ends_with_the_monitor() {
        let directory = tempfile::tempdir().unwrap();
        let socket = directory.path().join("recovery.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let (hang_up, hung_up) = std::sync::mpsc::channel();
        let monitor = std::thread::spawn(move || fake_monitor(listener, hung_up));
        let holder = {
            let socket = socket.clone();
            std::thread::spawn(move || hold(&socket))
        };
        let record = holder_record(&socket);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !record.exists() {
            assert!(std::time::Instant::now() < deadline, "no holder record");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let held = HeldMonitor::find(&socket).expect("the holder (this process) runs");
        assert_eq!(held.holder_pid, std::process::id());
        let answer = held
            .execute_oob(
                "migrate-recover",
                Some(json!({ "uri": "unix:/x" })),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(answer, json!({ "ok": true }));
        hang_up.send(()).unwrap();
        monitor.join().unwrap();
        holder.join().unwrap().unwrap();
    }
}
