//! The store's key-value model for the checker, and the whole-history check.
//!
//! What the store promises (crates/store, `kv.rs` and `storage.rs`): a transaction checks its
//! conditions (key absent, key exists, key's `mod_revision` equals) against the state before
//! it, then applies its puts and deletes atomically; a transaction that changes at least one
//! key takes the next global revision, every put key gets `mod_revision` = that revision,
//! `create_revision` = it when the key was absent, and `version` + 1; the answer carries the
//! store's revision after the transaction (the current one when nothing changed) and how many
//! keys were deleted. A read returns the key's value and its three counters.
//!
//! **The global revision couples keys**, which would defeat checking key by key
//! (P-compositionality). The model splits the promise in two:
//! - per key, exactly: values, versions and existence, and every revision the key shows: a
//!   change's revision is the one its writer was told and is larger than every earlier change
//!   of the key; a read shows the revision of the last change; a no-op or failed transaction
//!   answers a revision at least that of the key's last change. A change whose outcome was lost
//!   gets a symbolic revision "larger than r", bound by the first read that shows it.
//! - across keys, in [`check_revision_order`]: the revisions answered are unique per changing
//!   transaction and never go backwards in real time (an operation that returned before
//!   another was invoked answered a revision no larger, strictly smaller when the later one
//!   changed something).
//!
//! Both are necessary for linearizability of the store; together they miss only violations
//! that need revisions of several keys at once to show (e.g. two concurrent writers whose
//! revision order contradicts the order two readers of different keys imply), and gaps in the
//! revision sequence are not checked (other clients may write unrecorded keys).
//!
//! Each operation must be about one key (conditions and operations on the same key); a
//! history with a multi-key transaction or a prefix delete is refused.

use std::collections::BTreeMap;

use crate::checker::{Model, Operation, Outcome, check_operations_in_order};

/// A condition of a transaction on its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Condition {
    /// The key does not exist.
    Absent,
    /// The key exists.
    Exists,
    /// The key exists with this `mod_revision`.
    ModRevision(u64),
}

/// A change a transaction makes to its key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Change {
    /// Create or replace the value.
    Put(Vec<u8>),
    /// Delete the key (no change if absent).
    Delete,
}

/// What a client asked the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvInput {
    /// A linearizable read of one key.
    Get {
        /// The key.
        key: String,
    },
    /// A transaction on one key.
    Transaction {
        /// The key every condition and change is about.
        key: String,
        /// Conditions, all of which must hold.
        conditions: Vec<Condition>,
        /// Changes applied in order when they do.
        changes: Vec<Change>,
    },
}

impl KvInput {
    /// The key the operation is about.
    pub fn key(&self) -> &str {
        match self {
            KvInput::Get { key } | KvInput::Transaction { key, .. } => key,
        }
    }
}

/// A key as a read returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The value.
    pub value: Vec<u8>,
    /// Revision that created the key.
    pub create_revision: u64,
    /// Revision that last changed it.
    pub mod_revision: u64,
    /// Writes since creation.
    pub version: u64,
}

/// What the store answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOutput {
    /// A read's answer (None: the key does not exist).
    Get(Option<Observed>),
    /// A transaction's answer.
    Transaction {
        /// Whether every condition held.
        succeeded: bool,
        /// The store's revision after the transaction.
        revision: u64,
        /// Keys deleted.
        deleted_keys: u64,
        /// When it failed: the index of the first condition that did not hold and the key's
        /// `mod_revision` the store saw (None: absent).
        failed_condition: Option<(usize, Option<u64>)>,
    },
}

/// One recorded operation on the store.
pub type KvOperation = Operation<KvInput, KvOutput>;

/// A revision the model knows, or only a lower bound of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Revision {
    Known(u64),
    /// Unknown, strictly greater than this.
    After(u64),
}

impl Revision {
    /// Whether the revision can be `seen`; the bound revision if so.
    fn matches(self, seen: u64) -> Option<Revision> {
        match self {
            Revision::Known(known) => (known == seen).then_some(self),
            Revision::After(floor) => (seen > floor).then_some(Revision::Known(seen)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Entry {
    value: Vec<u8>,
    create_revision: Revision,
    mod_revision: Revision,
    version: u64,
}

/// The model state of one key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct KeyState {
    entry: Option<Entry>,
    /// Every change to the key so far has a revision ≤ this (the largest known one).
    last_change: u64,
}

/// The first condition that did not hold and the key's `mod_revision` then (None: absent).
type FailedCondition = (usize, Option<Revision>);

/// The sequential specification of one key of the store.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyModel;

impl KeyModel {
    /// Where the conditions leave us: for each way they can be resolved against `state`
    /// (a symbolic `mod_revision` can go either way), the state with bindings made and
    /// whether they all held, and the first failing condition with the revision seen.
    fn resolve_conditions(
        state: &KeyState,
        conditions: &[Condition],
    ) -> Vec<(KeyState, Option<FailedCondition>)> {
        let mut branches = vec![(state.clone(), None)];
        for (index, condition) in conditions.iter().enumerate() {
            let mut next = Vec::new();
            for (state, failed) in branches {
                if failed.is_some() {
                    next.push((state, failed));
                    continue;
                }
                let failure = |state: &KeyState| {
                    Some((index, state.entry.as_ref().map(|entry| entry.mod_revision)))
                };
                match (condition, &state.entry) {
                    (Condition::Absent, None) | (Condition::Exists, Some(_)) => {
                        next.push((state, None))
                    }
                    (Condition::Absent, Some(_))
                    | (Condition::Exists, None)
                    | (Condition::ModRevision(_), None) => {
                        let failed = failure(&state);
                        next.push((state, failed));
                    }
                    (Condition::ModRevision(wanted), Some(entry)) => match entry.mod_revision {
                        Revision::Known(known) => {
                            let failed = (known != *wanted).then(|| failure(&state)).flatten();
                            next.push((state, failed));
                        }
                        Revision::After(floor) => {
                            if *wanted > floor {
                                let mut bound = state.clone();
                                if let Some(entry) = bound.entry.as_mut() {
                                    entry.mod_revision = Revision::Known(*wanted);
                                }
                                next.push((bound, None));
                            }
                            let failed = failure(&state);
                            next.push((state, failed));
                        }
                    },
                }
            }
            branches = next;
        }
        branches
    }

    /// Applies the changes at `revision`; returns the new state, whether anything changed and
    /// how many deletes removed the key.
    fn apply(state: &KeyState, changes: &[Change], revision: Revision) -> (KeyState, bool, u64) {
        let mut state = state.clone();
        let mut changed = false;
        let mut deleted = 0;
        for change in changes {
            match change {
                Change::Put(value) => {
                    let entry = match state.entry.take() {
                        Some(entry) => Entry {
                            value: value.clone(),
                            create_revision: entry.create_revision,
                            mod_revision: revision,
                            version: entry.version + 1,
                        },
                        None => Entry {
                            value: value.clone(),
                            create_revision: revision,
                            mod_revision: revision,
                            version: 1,
                        },
                    };
                    state.entry = Some(entry);
                    changed = true;
                }
                Change::Delete => {
                    if state.entry.take().is_some() {
                        deleted += 1;
                        changed = true;
                    }
                }
            }
        }
        (state, changed, deleted)
    }
}

impl Model for KeyModel {
    type State = KeyState;
    type Input = KvInput;
    type Output = KvOutput;

    fn init(&self) -> KeyState {
        KeyState::default()
    }

    fn step(&self, state: &KeyState, input: &KvInput, output: Option<&KvOutput>) -> Vec<KeyState> {
        match (input, output) {
            (KvInput::Get { .. }, None) => vec![state.clone()],
            (KvInput::Get { .. }, Some(KvOutput::Get(seen))) => match (&state.entry, seen) {
                (None, None) => vec![state.clone()],
                (Some(entry), Some(seen)) => {
                    if entry.value != seen.value || entry.version != seen.version {
                        return vec![];
                    }
                    let (Some(mod_revision), Some(create_revision)) = (
                        entry.mod_revision.matches(seen.mod_revision),
                        entry.create_revision.matches(seen.create_revision),
                    ) else {
                        return vec![];
                    };
                    if seen.create_revision > seen.mod_revision {
                        return vec![];
                    }
                    let mut next = state.clone();
                    next.entry = Some(Entry {
                        mod_revision,
                        create_revision,
                        ..entry.clone()
                    });
                    next.last_change = next.last_change.max(seen.mod_revision);
                    vec![next]
                }
                _ => vec![],
            },
            (KvInput::Transaction { .. }, Some(KvOutput::Get(_)))
            | (KvInput::Get { .. }, Some(KvOutput::Transaction { .. })) => vec![],
            (
                KvInput::Transaction {
                    conditions,
                    changes,
                    ..
                },
                None,
            ) => {
                let mut states = Vec::new();
                for (resolved, failed) in Self::resolve_conditions(state, conditions) {
                    if failed.is_some() {
                        states.push(resolved);
                    } else {
                        let revision = Revision::After(resolved.last_change);
                        states.push(Self::apply(&resolved, changes, revision).0);
                    }
                }
                states
            }
            (
                KvInput::Transaction {
                    conditions,
                    changes,
                    ..
                },
                Some(KvOutput::Transaction {
                    succeeded,
                    revision,
                    deleted_keys,
                    failed_condition,
                }),
            ) => {
                let mut states = Vec::new();
                for (resolved, failed) in Self::resolve_conditions(state, conditions) {
                    match (failed, succeeded) {
                        (None, true) => {
                            let (next, changed, deleted) =
                                Self::apply(&resolved, changes, Revision::Known(*revision));
                            let revision_ok = if changed {
                                *revision > resolved.last_change
                            } else {
                                *revision >= resolved.last_change
                            };
                            if revision_ok && deleted == *deleted_keys {
                                let mut next = next;
                                if changed {
                                    next.last_change = *revision;
                                }
                                states.push(next);
                            }
                        }
                        (Some((index, actual)), false) => {
                            // The store reports the failing condition and the revision it saw;
                            // it must be the one the model fails on, and binds a symbolic one.
                            let mut next = resolved;
                            let agrees = match failed_condition {
                                None => true,
                                Some((reported_index, reported_actual)) => {
                                    *reported_index == index
                                        && match (actual, reported_actual) {
                                            (None, None) => true,
                                            (Some(revision), Some(seen)) => {
                                                match revision.matches(*seen) {
                                                    Some(bound) => {
                                                        if let Some(entry) = next.entry.as_mut() {
                                                            entry.mod_revision = bound;
                                                        }
                                                        true
                                                    }
                                                    None => false,
                                                }
                                            }
                                            _ => false,
                                        }
                                }
                            };
                            if agrees && *revision >= next.last_change && *deleted_keys == 0 {
                                states.push(next);
                            }
                        }
                        _ => {}
                    }
                }
                states
            }
        }
    }
}

/// Why a history cannot be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// An operation returned before it was invoked.
    #[error("operation {index} returned at {returned} before it was invoked at {invoked}")]
    ReturnedBeforeInvoked {
        /// Its position in the history.
        index: usize,
        /// Invocation time.
        invoked: u64,
        /// Return time.
        returned: u64,
    },
    /// A get answered like a transaction or the other way round.
    #[error("operation {index} has an answer of the wrong kind for its request")]
    MismatchedOutput {
        /// Its position in the history.
        index: usize,
    },
}

/// The verdict on a whole history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every key's operations are linearizable and revisions are consistent across keys.
    Linearizable,
    /// A violation, explained.
    NotLinearizable {
        /// The key whose operations cannot be ordered (None: a cross-key revision violation).
        key: Option<String>,
        /// What went wrong, with the operations involved.
        explanation: String,
    },
    /// The search budget ran out on a key before an answer.
    Unknown {
        /// The key.
        key: String,
        /// Steps taken.
        steps: u64,
    },
}

/// Options of [`check_history`].
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// Search steps allowed per key before giving up with [`Verdict::Unknown`].
    pub step_budget_per_key: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            step_budget_per_key: 5_000_000,
        }
    }
}

/// How much a history says: the writes that succeeded and the operations whose outcome is
/// unknown (a history with few successful writes proves little).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySummary {
    pub operations: usize,
    pub successful_writes: usize,
    pub unknown_outcomes: usize,
}

/// Counts what [`HistorySummary`] reports.
pub fn summarize(history: &[crate::Operation<KvInput, KvOutput>]) -> HistorySummary {
    HistorySummary {
        operations: history.len(),
        successful_writes: history
            .iter()
            .filter(|operation| {
                matches!(
                    operation.output,
                    Some(KvOutput::Transaction {
                        succeeded: true,
                        ..
                    })
                )
            })
            .count(),
        unknown_outcomes: history
            .iter()
            .filter(|operation| operation.output.is_none())
            .count(),
    }
}

/// Checks a history of single-key operations on the store: split by key, each key checked
/// against [`KeyModel`], then revisions checked across keys.
pub fn check_history(
    history: &[KvOperation],
    options: CheckOptions,
) -> Result<Verdict, HistoryError> {
    for (index, operation) in history.iter().enumerate() {
        if let Some(returned) = operation.returned
            && returned < operation.invoked
        {
            return Err(HistoryError::ReturnedBeforeInvoked {
                index,
                invoked: operation.invoked,
                returned,
            });
        }
        let mismatched = matches!(
            (&operation.input, &operation.output),
            (KvInput::Get { .. }, Some(KvOutput::Transaction { .. }))
                | (KvInput::Transaction { .. }, Some(KvOutput::Get(_)))
        );
        if mismatched {
            return Err(HistoryError::MismatchedOutput { index });
        }
    }
    if let Some(explanation) = check_revision_order(history) {
        return Ok(Verdict::NotLinearizable {
            key: None,
            explanation,
        });
    }
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, operation) in history.iter().enumerate() {
        // A read whose answer was lost changes nothing and shows nothing: any linearization of
        // the others takes it anywhere in its interval, so it is left out. Kept, its interval
        // (open to the end of the history) made it concurrent with everything after it: a
        // five-host history with a few dozen such reads ran the search out of its budget.
        if matches!(operation.input, KvInput::Get { .. }) && operation.output.is_none() {
            continue;
        }
        by_key.entry(operation.input.key()).or_default().push(index);
    }
    for (key, indices) in by_key {
        let operations: Vec<KvOperation> = indices
            .iter()
            .map(|&index| history[index].clone())
            .collect();
        let after = interchangeable_chains(&operations);
        match check_operations_in_order(&KeyModel, &operations, options.step_budget_per_key, &after)
        {
            Outcome::Linearizable => {}
            Outcome::Unknown { steps } => {
                return Ok(Verdict::Unknown {
                    key: key.to_string(),
                    steps,
                });
            }
            Outcome::NotLinearizable { longest_prefix } => {
                let mut explanation = format!(
                    "the {} operations on key {key:?} have no linearization; the longest \
                     linearizable prefix found:",
                    operations.len()
                );
                for &position in &longest_prefix {
                    explanation.push_str(&format!(
                        "\n  #{} {}",
                        indices[position],
                        describe(&operations[position])
                    ));
                }
                explanation.push_str("\nnone of these could come next:");
                for (position, operation) in operations.iter().enumerate() {
                    if !longest_prefix.contains(&position) {
                        explanation.push_str(&format!(
                            "\n  #{} {}",
                            indices[position],
                            describe(operation)
                        ));
                    }
                }
                return Ok(Verdict::NotLinearizable {
                    key: Some(key.to_string()),
                    explanation,
                });
            }
        }
    }
    Ok(Verdict::Linearizable)
}

/// For the operations of one key: chains of transactions whose outcome was lost and that
/// can stand in for one another, each after the one invoked just before it (see
/// [`check_operations_in_order`]). Two such transactions are interchangeable when their
/// conditions and changes are the same once every put value no read returned is blanked: a
/// value nobody read shows nowhere (conditions see existence and revisions, which both would
/// set alike, and a lost outcome bounds the revision only from below), and neither returned,
/// so the earlier-invoked fits wherever the later one does. Histories with many lost writes
/// (a leader killed under load) otherwise search every subset of them taken so far.
fn interchangeable_chains(operations: &[KvOperation]) -> Vec<Option<usize>> {
    let read_values: std::collections::BTreeSet<&[u8]> = operations
        .iter()
        .filter_map(|operation| match &operation.output {
            Some(KvOutput::Get(Some(observed))) => Some(observed.value.as_slice()),
            _ => None,
        })
        .collect();
    let mut lost: Vec<usize> = (0..operations.len())
        .filter(|&index| {
            let operation = &operations[index];
            operation.output.is_none()
                && operation.returned.is_none()
                && matches!(operation.input, KvInput::Transaction { .. })
        })
        .collect();
    lost.sort_by_key(|&index| (operations[index].invoked, index));
    let mut last_of_kind: std::collections::HashMap<(Vec<Condition>, Vec<Option<Change>>), usize> =
        std::collections::HashMap::new();
    let mut after = vec![None; operations.len()];
    for index in lost {
        let KvInput::Transaction {
            conditions,
            changes,
            ..
        } = &operations[index].input
        else {
            continue;
        };
        let shown: Vec<Option<Change>> = changes
            .iter()
            .map(|change| match change {
                Change::Put(value) if !read_values.contains(value.as_slice()) => None,
                other => Some(other.clone()),
            })
            .collect();
        if let Some(previous) = last_of_kind.insert((conditions.clone(), shown), index) {
            after[index] = Some(previous);
        }
    }
    after
}

fn describe(operation: &KvOperation) -> String {
    let returned = match operation.returned {
        Some(returned) => returned.to_string(),
        None => "never".to_string(),
    };
    let output = match &operation.output {
        Some(output) => format!("{output:?}"),
        None => "outcome unknown".to_string(),
    };
    format!(
        "client {} [{}..{returned}] {:?} -> {output}",
        operation.client, operation.invoked, operation.input
    )
}

/// The revision an operation's answer carries and whether it changed something.
fn answered_revision(operation: &KvOperation) -> Option<(u64, bool)> {
    match (&operation.input, &operation.output) {
        (
            KvInput::Transaction { changes, .. },
            Some(KvOutput::Transaction {
                succeeded,
                revision,
                deleted_keys,
                ..
            }),
        ) => {
            let changed = *succeeded
                && (changes
                    .iter()
                    .any(|change| matches!(change, Change::Put(_)))
                    || *deleted_keys > 0);
            Some((*revision, changed))
        }
        _ => None,
    }
}

/// Cross-key revision rules: changing transactions have distinct revisions, and an operation
/// that returned before another was invoked answered a revision no larger (strictly smaller
/// when the later one changed something). Returns a description of the first violation.
pub fn check_revision_order(history: &[KvOperation]) -> Option<String> {
    let mut changers: BTreeMap<u64, usize> = BTreeMap::new();
    for (index, operation) in history.iter().enumerate() {
        if let Some((revision, true)) = answered_revision(operation)
            && let Some(other) = changers.insert(revision, index)
        {
            return Some(format!(
                "two transactions changed the store at the same revision {revision}: #{other} {} and #{index} {}",
                describe(&history[other]),
                describe(operation)
            ));
        }
    }
    let mut by_return: Vec<(u64, u64, usize)> = history
        .iter()
        .enumerate()
        .filter_map(|(index, operation)| {
            let (revision, _) = answered_revision(operation)?;
            Some((operation.returned?, revision, index))
        })
        .collect();
    by_return.sort_unstable();
    let mut by_invoke: Vec<(u64, usize)> = history
        .iter()
        .enumerate()
        .filter(|(_, operation)| answered_revision(operation).is_some())
        .map(|(index, operation)| (operation.invoked, index))
        .collect();
    by_invoke.sort_unstable();
    let mut finished = 0;
    let mut highest: Option<(u64, usize)> = None;
    for (invoked, index) in by_invoke {
        while finished < by_return.len() && by_return[finished].0 < invoked {
            let (_, revision, earlier) = by_return[finished];
            if highest.is_none_or(|(best, _)| revision > best) {
                highest = Some((revision, earlier));
            }
            finished += 1;
        }
        let Some((revision, changed)) = answered_revision(&history[index]) else {
            continue;
        };
        if let Some((earlier_revision, earlier)) = highest {
            let backwards = if changed {
                revision <= earlier_revision
            } else {
                revision < earlier_revision
            };
            if backwards {
                return Some(format!(
                    "revisions went backwards in real time: #{earlier} {} returned revision \
                     {earlier_revision} before #{index} {} was invoked, which answered {revision}",
                    describe(&history[earlier]),
                    describe(&history[index])
                ));
            }
        }
    }
    None
}
