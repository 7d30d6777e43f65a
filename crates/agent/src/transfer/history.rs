//! Finished transfers, kept across restarts of `serve` in `<data dir>/transfers.jsonl`
//! ([`crate::paths::DataPaths::transfer_history_file`]): one
//! [`TransferInfo`] as JSON per line, appended when a transfer ends. `transfer list` and
//! `transfer show` read it after the transfers of the running `serve`.
//!
//! Only the last [`HISTORY_KEPT`] are kept: the file is rewritten with them when it has grown to
//! twice that at a start. A line that does not parse (a write cut short by a crash, a newer
//! format) is skipped with a warning. History is a convenience, not state: failing to write it
//! is logged, never an error of the transfer.

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use novacron_types::TransferInfo;

/// How many finished transfers are kept.
pub const HISTORY_KEPT: usize = 1000;

pub(crate) struct TransferHistory {
    path: PathBuf,
    finished: Mutex<VecDeque<TransferInfo>>,
}

impl TransferHistory {
    /// Loads the history at `path` (none yet is an empty history).
    pub fn open(path: PathBuf) -> Self {
        let mut finished = VecDeque::new();
        let mut lines = 0usize;
        if let Ok(text) = std::fs::read_to_string(&path) {
            if !text.is_empty() && !text.ends_with('\n') {
                // A line cut short by a crash: end it, so the next line starts clean.
                let ended = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .and_then(|mut file| file.write_all(b"\n"));
                if let Err(error) = ended {
                    tracing::warn!(path = %path.display(), %error, "cannot end the transfer history's last line");
                }
            }
            for line in text.lines().filter(|line| !line.trim().is_empty()) {
                lines += 1;
                match serde_json::from_str::<TransferInfo>(line) {
                    Ok(info) => {
                        finished.push_back(info);
                        if finished.len() > HISTORY_KEPT {
                            finished.pop_front();
                        }
                    }
                    Err(error) => tracing::warn!(
                        path = %path.display(), %error,
                        "skipping an unreadable line of the transfer history"
                    ),
                }
            }
        }
        let history = Self {
            path,
            finished: Mutex::new(finished),
        };
        if lines >= 2 * HISTORY_KEPT {
            history.rewrite();
        }
        history
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<TransferInfo>> {
        self.finished
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps only the last [`HISTORY_KEPT`] on disk (a temporary file renamed over the old).
    fn rewrite(&self) {
        let mut text = String::new();
        for info in self.lock().iter() {
            if let Ok(line) = serde_json::to_string(info) {
                text.push_str(&line);
                text.push('\n');
            }
        }
        let temporary = self.path.with_extension("jsonl.tmp");
        let result =
            std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, &self.path));
        if let Err(error) = result {
            tracing::warn!(path = %self.path.display(), %error, "cannot trim the transfer history");
        }
    }

    /// Adds a finished transfer.
    pub fn record(&self, info: TransferInfo) {
        let line = match serde_json::to_string(&info) {
            Ok(line) => line,
            Err(error) => {
                tracing::warn!(%error, "cannot encode a transfer for the history");
                return;
            }
        };
        {
            let mut finished = self.lock();
            finished.retain(|kept| kept.id != info.id);
            finished.push_back(info);
            if finished.len() > HISTORY_KEPT {
                finished.pop_front();
            }
        }
        let result = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
        if let Err(error) = result {
            tracing::warn!(path = %self.path.display(), %error, "cannot write the transfer history");
        }
    }

    /// The finished transfers, oldest first.
    pub fn list(&self) -> Vec<TransferInfo> {
        self.lock().iter().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Option<TransferInfo> {
        self.lock().iter().rev().find(|info| info.id == id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_types::{TransferDirection, TransferState};

    fn info(id: &str) -> TransferInfo {
        let mut info: TransferInfo = serde_json::from_value(serde_json::json!({
            "id": id,
            "direction": "push",
            "initiated_by_peer": false,
            "image": "base",
            "target_name": "base",
            "image_id": null,
            "peer_address": "127.0.0.1:7181",
            "peer_fingerprint": "sha256:00",
            "state": "succeeded",
            "message": null,
            "error_code": null,
            "total_bytes": 10,
            "raw_bytes_done": 10,
            "wire_bytes": 5,
            "already_present": false,
            "started_at": 1,
            "elapsed_seconds": 1.0,
            "rate_bytes_per_second": 10.0,
            "wire_rate_bytes_per_second": 5.0,
            "reconnections": 0,
            "zstd_level": null,
            "forecast_bits_per_second": null,
            "eta_seconds": null,
            "eta_basis": null
        }))
        .expect("a transfer");
        info.direction = TransferDirection::Push;
        info.state = TransferState::Succeeded;
        info
    }

    #[test]
    fn finished_transfers_survive_a_reopen_and_damaged_lines_are_skipped() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("transfers.jsonl");
        let history = TransferHistory::open(path.clone());
        assert!(history.list().is_empty());
        history.record(info("a"));
        history.record(info("b"));
        drop(history);
        // A crash in the middle of a line.
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("open");
        file.write_all(b"{\"id\": \"c\", \"dire").expect("write");
        drop(file);
        let history = TransferHistory::open(path.clone());
        let ids: Vec<String> = history.list().into_iter().map(|info| info.id).collect();
        assert_eq!(ids, vec!["a", "b"]);
        assert_eq!(history.get("b").expect("b").wire_bytes, 5);
        assert!(history.get("c").is_none());
        // The next transfer's line is not glued to the damaged one.
        history.record(info("d"));
        drop(history);
        let history = TransferHistory::open(path);
        let ids: Vec<String> = history.list().into_iter().map(|info| info.id).collect();
        assert_eq!(ids, vec!["a", "b", "d"]);
    }

    #[test]
    fn only_the_last_transfers_are_kept() {
        let directory = tempfile::tempdir().expect("tempdir");
        let path = directory.path().join("transfers.jsonl");
        let history = TransferHistory::open(path.clone());
        for index in 0..2 * HISTORY_KEPT + 5 {
            history.record(info(&format!("t{index}")));
        }
        assert_eq!(history.list().len(), HISTORY_KEPT);
        drop(history);
        let history = TransferHistory::open(path.clone());
        let list = history.list();
        assert_eq!(list.len(), HISTORY_KEPT);
        assert_eq!(
            list.last().expect("newest").id,
            format!("t{}", 2 * HISTORY_KEPT + 4)
        );
        let lines = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .count();
        assert_eq!(lines, HISTORY_KEPT, "the file was trimmed at the start");
    }
}
