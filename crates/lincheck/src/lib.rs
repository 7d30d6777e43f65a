//! A linearizability checker for NovaCron's store.
//!
//! [`checker`] is the generic search: Wing & Gong's backtracking over a history's call and
//! return events with Lowe's cache of (operations linearized, model state), as in Porcupine.
//! Operations whose outcome a client never learnt (timeouts, lost leaders) have no return: they
//! may take effect at any point after their call, or not at all.
//!
//! [`kv`] is the store's model (a revisioned key-value map with conditional transactions), the
//! split of a history by key (P-compositionality) and the cross-key revision rules that the
//! split cannot see; its module documentation says exactly what is and is not checked.
//!
//! [`recorder`] stamps operations from concurrent clients with a shared monotonic clock.
//! Nothing here talks to the store; tests record histories and hand them over.

pub mod checker;
pub mod kv;
pub mod recorder;

pub use checker::{Model, Operation, Outcome, check_operations};
pub use kv::{
    Change, CheckOptions, Condition, HistoryError, HistorySummary, KeyModel, KvInput, KvOperation,
    KvOutput, Observed, Verdict, check_history, check_revision_order, summarize,
};
pub use recorder::{Pending, Recorder};
