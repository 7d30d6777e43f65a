//! Live migrations (`novacron vm migrate`): the request, and the record kept in the store (key
//! `migrations/<id>`) that is both the migration's state machine and its history.
//!
//! The source host's agent drives a migration and writes its phase and progress; the destination
//! host's agent prepares the incoming QEMU when the source asks for it. The record changes owner of
//! the VM in the same store transaction that marks the migration completed, so at every moment
//! exactly one host owns the VM: the source until that transaction, the destination after it.

use crate::ErrorCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Default limit on the guest's pause at switch-over.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// Smallest and largest downtime limit accepted.
pub const DOWNTIME_LIMIT_RANGE_MS: (u64, u64) = (10, 60_000);
/// Default time a migration may take before it is cancelled.
pub const DEFAULT_MIGRATION_TIMEOUT_SECS: u64 = 600;
/// Default time a VM in post-copy waits for a lost link to its source to come back.
pub const DEFAULT_POST_COPY_LINK_WAIT_SECS: u64 = 300;
/// Smallest and largest post-copy link wait accepted.
pub const POST_COPY_LINK_WAIT_RANGE_SECS: (u64, u64) = (10, 3_600);

fn default_post_copy_link_wait_secs() -> u64 {
    DEFAULT_POST_COPY_LINK_WAIT_SECS
}

/// `POST /api/v1/vms/{name}/migrate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrateVmRequest {
    /// Destination host; `None` lets placement choose among the other hosts.
    pub to: Option<String>,
    /// Longest pause of the guest at switch-over, in milliseconds (default 300).
    pub downtime_limit_ms: Option<u64>,
    /// Give up (and leave the VM on the source) after this many seconds (default 600).
    pub timeout_secs: Option<u64>,
    /// What to do when the plan says precopy would not converge (default `throttle`).
    #[serde(default)]
    pub when_not_converging: Option<ConvergencePolicy>,
    /// With post-copy: how long, in seconds, the VM waits on the destination for a lost link
    /// to its source to come back (the guest stalls meanwhile on the pages it lacks) before its
    /// running state is given up (default 300, 10 to 3600).
    #[serde(default)]
    pub post_copy_link_wait_secs: Option<u64>,
}

/// What a migration does when the guest dirties memory faster than the link carries it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ConvergencePolicy {
    /// Slow the guest's vCPUs (QEMU's auto-converge), starting at the throttle the plan says
    /// is needed and raising it while the dirty rate stays above half the link's.
    #[default]
    Throttle,
    /// Never slow the guest: copy on until the migration converges or `--timeout` ends it.
    KeepCopying,
    /// After the first full copy, switch to post-copy: the guest runs on the destination at
    /// once and the pages it has not received yet are fetched from the source as it touches
    /// them. The pause stays short whatever the dirty rate, but from the switch on the VM needs
    /// both hosts and the link: if either fails before the last page arrived, the guest's
    /// running state is lost: the VM fails on the destination as after a crash (and restarts
    /// there if its restart policy says so). A local disk is mirrored before the switch; from
    /// the switch on, the destination's copy is the VM's disk.
    PostCopy,
}

impl ConvergencePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ConvergencePolicy::Throttle => "throttle",
            ConvergencePolicy::KeepCopying => "keep-copying",
            ConvergencePolicy::PostCopy => "post-copy",
        }
    }
}

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    /// Recorded; the source host has not picked it up yet.
    Requested,
    /// The source asked the destination to start an incoming QEMU.
    Preparing,
    /// The VM's local disk is mirrored to the destination (only blocks the destination's copy
    /// of the base image lacks); guest writes keep being mirrored until the switch-over.
    Disk,
    /// Memory is being copied while the guest runs.
    Memory,
    /// The guest is paused; the last pages and device state are in flight, then the new owner
    /// is recorded.
    SwitchOver,
    /// Post-copy: the VM runs on the destination (it owns it now) and the pages it has not
    /// received yet still come from the source, on demand and in the background.
    PostCopy,
    /// The VM runs on the destination.
    Completed,
    /// The VM stayed on the source (see `message`).
    Failed,
    /// Cancelled by the user; the VM stayed on the source.
    Cancelled,
}

impl MigrationPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Requested => "requested",
            MigrationPhase::Preparing => "preparing",
            MigrationPhase::Disk => "disk",
            MigrationPhase::Memory => "memory",
            MigrationPhase::SwitchOver => "switch-over",
            MigrationPhase::PostCopy => "post-copy",
            MigrationPhase::Completed => "completed",
            MigrationPhase::Failed => "failed",
            MigrationPhase::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled
        )
    }
}

impl std::fmt::Display for MigrationPhase {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Counters of a migration, written by the source about once a second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationProgress {
    /// Guest memory size.
    pub memory_bytes: u64,
    /// The disk mirror's work: bytes to copy (QEMU's estimate, it grows with guest writes) and
    /// copied so far; zero for a VM without a disk.
    #[serde(default)]
    pub disk_bytes: u64,
    #[serde(default)]
    pub disk_bytes_done: u64,
    /// Bytes NovaCron put on the link for the disk (its writes after the page codec: blocks of
    /// the base image sent as hashes, zero blocks, deltas, zstd).
    #[serde(default)]
    pub disk_wire_bytes: u64,
    /// Bytes of QEMU's migration stream so far (what QEMU alone would have sent).
    pub stream_bytes: u64,
    /// Bytes NovaCron put on the link for it (after the page codec and compression).
    pub wire_bytes: u64,
    /// Memory QEMU still has to send in this pass.
    pub remaining_bytes: u64,
    /// Precopy passes over memory so far.
    pub passes: u64,
    /// The guest's dirty rate, pages per second, as QEMU measured it.
    pub dirty_pages_per_second: u64,
    /// Link rate (bits per second) measured by the transport.
    pub rate_bits_per_second: f64,
    /// QEMU's estimate of the switch-over pause, in milliseconds.
    pub expected_downtime_ms: Option<u64>,
    /// Seconds until the end, at the current rate.
    pub eta_seconds: Option<f64>,
    /// Pages sent as zero, already known to the destination, delta, or literal.
    pub pages_zero: u64,
    pub pages_known: u64,
    /// Of the known pages, those found in the VM's base image at the destination (RAM holding
    /// disk contents, e.g. the page cache) rather than sent earlier in this move.
    #[serde(default)]
    pub pages_from_image: u64,
    /// Of the known pages, distinct blocks the disk mirror delivered earlier in this move (RAM
    /// holding what the guest wrote to its local disk), counted apart from `pages_from_image`.
    #[serde(default)]
    pub blocks_from_disk_mirror: u64,
    /// Of the known pages, those equal to a block of the VM's kernel or initrd (a direct kernel
    /// boot), or of what the guest unpacked from them (the kernel, the initramfs's files),
    /// which both hosts held with the same digest: the kernel image QEMU loaded stays in guest
    /// RAM after boot. Counted apart from `pages_from_image`.
    #[serde(default)]
    pub pages_from_boot_files: u64,
    pub pages_delta: u64,
    pub pages_literal: u64,
    /// The convergence plan, in words: whether precopy converges over this link, in how many
    /// passes and seconds, or the throttle it needs (recomputed every poll).
    #[serde(default)]
    pub plan: Option<String>,
    /// Whether the plan expects precopy to converge without a throttle.
    #[serde(default)]
    pub converges: Option<bool>,
    /// QEMU's guest CPU throttle now, percent (auto-converge).
    #[serde(default)]
    pub throttle_percent: u64,
    /// The downtime limit QEMU was given: the user's, minus the time the proxy's in-flight
    /// bytes take to cross after QEMU stops the guest.
    #[serde(default)]
    pub qemu_downtime_limit_ms: Option<u64>,
}

/// One migration, as kept in the store and returned by the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrationRecord {
    pub format_version: u32,
    pub id: String,
    pub vm: String,
    pub vm_uuid: String,
    /// Host the VM runs on when the migration starts.
    pub source: String,
    pub destination: String,
    /// Why the destination was chosen when placement chose it.
    pub placement: Option<String>,
    pub phase: MigrationPhase,
    pub downtime_limit_ms: u64,
    pub timeout_secs: u64,
    #[serde(default)]
    pub when_not_converging: ConvergencePolicy,
    /// With post-copy, from the switch on: how long both hosts wait for a lost link to come
    /// back before the copy, and with it the guest's running state, is given up.
    #[serde(default = "default_post_copy_link_wait_secs")]
    pub post_copy_link_wait_secs: u64,
    /// Set by `vm migrate --cancel`; the source aborts unless the new owner is already recorded.
    pub cancel_requested: bool,
    /// Unix seconds.
    pub created_at: u64,
    pub finished_at: Option<u64>,
    /// What happened, for a finished migration (always set for `failed`).
    pub message: Option<String>,
    pub error_code: Option<ErrorCode>,
    pub progress: MigrationProgress,
    /// Length and stream digest of QEMU's stream (BLAKE3 over the stream with each page's payload
    /// replaced by the page's BLAKE3), when the destination proved it rebuilt it identically.
    pub stream_checksum: Option<String>,
    /// Unix milliseconds of the source's STOP event and the destination's RESUME event: the
    /// guest's real pause (both clocks are the hosts' own).
    pub stopped_at_ms: Option<u64>,
    pub resumed_at_ms: Option<u64>,
    /// Seconds from the start of the memory copy to the end.
    pub total_seconds: Option<f64>,
    /// Where the memory copy's time went on each side, and so what set its pace (set when the
    /// copy ends).
    #[serde(default)]
    pub memory_pipeline: Option<MemoryPipeline>,
}

/// Where one side's codec thread spent a memory copy, in milliseconds: working (parsing,
/// hashing, compressing or rebuilding; on a busy host also waiting for a core), waiting for its
/// input, and waiting for its output to be taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CodecTime {
    pub working_ms: u64,
    pub waiting_for_input_ms: u64,
    pub waiting_for_output_ms: u64,
}

impl CodecTime {
    /// What this side did most.
    fn mostly(&self) -> CodecState {
        if self.working_ms >= self.waiting_for_input_ms.max(self.waiting_for_output_ms) {
            CodecState::Working
        } else if self.waiting_for_input_ms >= self.waiting_for_output_ms {
            CodecState::WaitingForInput
        } else {
            CodecState::WaitingForOutput
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CodecState {
    Working,
    WaitingForInput,
    WaitingForOutput,
}

/// The memory copy's pipeline: the source QEMU's stream → the source's codec → the link → the
/// destination's codec → the destination QEMU. Each codec's time says which neighbour it
/// waited for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemoryPipeline {
    /// Its input is the source QEMU's stream; its output goes onto the link.
    pub source: CodecTime,
    /// Its input comes off the link; its output goes into the destination QEMU. Not reported
    /// for a post-copy (the destination's guest runs before its stream ends).
    pub destination: Option<CodecTime>,
}

impl MemoryPipeline {
    /// The stage that set the copy's pace, in words.
    pub fn pace(&self) -> &'static str {
        use CodecState::*;
        match (
            self.source.mostly(),
            self.destination.map(|side| side.mostly()),
        ) {
            (WaitingForInput, _) => {
                "the source QEMU (its stream came slower than the rest took it)"
            }
            (_, Some(WaitingForOutput)) => "the destination QEMU loading the stream",
            (WaitingForOutput, Some(WaitingForInput) | None) => "the link",
            (Working, _) => "the source's codec (CPU: parsing, hashing, compressing)",
            (WaitingForOutput, Some(Working)) => "the destination's codec (CPU: rebuilding)",
        }
    }
}

impl std::fmt::Display for MemoryPipeline {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = |ms: u64| ms as f64 / 1000.0;
        write!(
            formatter,
            "{}; source codec working {:.1} s, waiting {:.1} s for QEMU, {:.1} s for the link",
            self.pace(),
            seconds(self.source.working_ms),
            seconds(self.source.waiting_for_input_ms),
            seconds(self.source.waiting_for_output_ms)
        )?;
        if let Some(destination) = &self.destination {
            write!(
                formatter,
                "; destination codec working {:.1} s, waiting {:.1} s for the link, {:.1} s \
                 for QEMU",
                seconds(destination.working_ms),
                seconds(destination.waiting_for_input_ms),
                seconds(destination.waiting_for_output_ms)
            )?;
        }
        Ok(())
    }
}

impl MigrationRecord {
    /// The guest's pause, from the source's STOP to the destination's RESUME.
    pub fn pause_ms(&self) -> Option<u64> {
        Some(self.resumed_at_ms?.saturating_sub(self.stopped_at_ms?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(working_ms: u64, waiting_for_input_ms: u64, waiting_for_output_ms: u64) -> CodecTime {
        CodecTime {
            working_ms,
            waiting_for_input_ms,
            waiting_for_output_ms,
        }
    }

    #[test]
    fn the_pace_is_the_stage_its_neighbours_waited_for() {
        // Measured at 1 Gbit/s, 0.5 % loss, adversarial guest: both codecs waited for the link.
        let link = MemoryPipeline {
            source: side(2770, 310, 3500),
            destination: Some(side(2860, 3980, 60)),
        };
        assert_eq!(link.pace(), "the link");
        // The realistic guest on the same link: the source's codec worked most.
        let source_cpu = MemoryPipeline {
            source: side(3670, 1050, 1930),
            destination: Some(side(3960, 2500, 310)),
        };
        assert!(source_cpu.pace().starts_with("the source's codec"));
        let destination_qemu = MemoryPipeline {
            source: side(1000, 200, 3000),
            destination: Some(side(800, 300, 3100)),
        };
        assert_eq!(
            destination_qemu.pace(),
            "the destination QEMU loading the stream"
        );
        let destination_cpu = MemoryPipeline {
            source: side(1000, 200, 3000),
            destination: Some(side(3500, 500, 100)),
        };
        assert!(
            destination_cpu
                .pace()
                .starts_with("the destination's codec")
        );
        let source_qemu = MemoryPipeline {
            source: side(500, 3000, 200),
            destination: Some(side(500, 3000, 200)),
        };
        assert!(source_qemu.pace().starts_with("the source QEMU"));
        // Post-copy: the destination does not report; the source's waits still tell.
        let post_copy = MemoryPipeline {
            source: side(500, 100, 2000),
            destination: None,
        };
        assert_eq!(post_copy.pace(), "the link");
        let text = link.to_string();
        assert!(
            text.starts_with("the link; source codec working 2.8 s, waiting 0.3 s for QEMU, 3.5 s for the link; destination codec working 2.9 s"),
            "{text}"
        );
        assert!(!post_copy.to_string().contains("destination codec"));
    }
}
