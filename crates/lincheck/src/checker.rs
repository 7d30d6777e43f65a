//! The generic search: is there an order of the operations, consistent with real time, in which
//! a sequential model produces every recorded output? Wing & Gong's backtracking over the
//! history's call and return events, with Lowe's cache of (set of operations linearized, model
//! state) so that a configuration reached twice is explored once (as in Porcupine).
//!
//! Models may be nondeterministic (an operation whose outcome was lost can leave several
//! states); the search then carries the set of possible states, so the cache and the
//! backtracking stay as in the deterministic algorithm.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Debug;
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    /// One state of the object.
    type State: Clone + Eq + Hash + Ord + Debug;
    /// What a client asked.
    type Input: Debug;
    /// What it was told.
    type Output: Debug;

    /// The state before any operation.
    fn init(&self) -> Self::State;

    /// The states the object may be in after applying `input` in `state` and answering
    /// `output`; empty when that answer is impossible there. `output` is None when the client
    /// never learnt the outcome (the operation may or may not have taken effect).
    fn step(
        &self,
        state: &Self::State,
        input: &Self::Input,
        output: Option<&Self::Output>,
    ) -> Vec<Self::State>;
}

/// One operation as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation<I, O> {
    /// Who issued it (for reports only).
    pub client: u64,
    /// What was asked.
    pub input: I,
    /// What was answered; None when the outcome is unknown (timeout, lost connection).
    pub output: Option<O>,
    /// When it was issued (any monotonic unit).
    pub invoked: u64,
    /// When the answer arrived; None when it never did, so the operation may take effect at
    /// any later time.
    pub returned: Option<u64>,
}

/// The checker's answer for one group of operations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// An order exists.
    Linearizable,
    /// No order exists. `longest_prefix` is the longest sequence of operations (indices into
    /// the input) the search could linearize before getting stuck, a starting point for
    /// reading the history.
    NotLinearizable {
        /// Indices of the operations in the longest linearizable prefix found.
        longest_prefix: Vec<usize>,
    },
    /// The search gave up after `steps` steps.
    Unknown {
        /// Steps taken.
        steps: u64,
    },
}

#[derive(Clone, Copy)]
struct Event {
    operation: usize,
    is_call: bool,
}

/// Checks one group of operations against `model`, giving up after `step_budget` search steps.
pub fn check_operations<M: Model>(
    model: &M,
    operations: &[Operation<M::Input, M::Output>],
    step_budget: u64,
) -> Outcome {
    check_operations_in_order(
        model,
        operations,
        step_budget,
        &vec![None; operations.len()],
    )
}

/// As [`check_operations`], where operation `j` may be linearized only after operation
/// `after[j]` (when set). For the caller to break symmetries: among operations that can stand
/// in for one another in any linearization (same effect, none returned, so the earlier-invoked
/// one fits wherever a later-invoked one does), only the orders that take them earliest-invoked
/// first need searching; without that, every subset of them taken so far is a configuration of
/// its own.
pub fn check_operations_in_order<M: Model>(
    model: &M,
    operations: &[Operation<M::Input, M::Output>],
    step_budget: u64,
    after: &[Option<usize>],
) -> Outcome {
    let count = operations.len();
    if count == 0 {
        return Outcome::Linearizable;
    }
    assert_eq!(after.len(), count, "one entry of `after` per operation");
    // Events sorted by time; at equal times calls come first, so operations whose intervals
    // only touch are treated as concurrent (the permissive reading).
    let mut events: Vec<(u64, u8, Event)> = Vec::with_capacity(count * 2);
    for (index, operation) in operations.iter().enumerate() {
        events.push((
            operation.invoked,
            0,
            Event {
                operation: index,
                is_call: true,
            },
        ));
        events.push((
            operation.returned.unwrap_or(u64::MAX),
            1,
            Event {
                operation: index,
                is_call: false,
            },
        ));
    }
    events.sort_by_key(|(time, order, event)| (*time, *order, event.operation));

    // A doubly linked list over the events; node 0 is the head sentinel, event i is node i + 1.
    let nodes = events.len() + 1;
    let mut next: Vec<usize> = (1..=nodes).collect();
    next[nodes - 1] = usize::MAX;
    let mut previous: Vec<usize> = (0..nodes).map(|i| i.wrapping_sub(1)).collect();
    let mut return_node = vec![0usize; count];
    let mut call_node = vec![0usize; count];
    for (position, (_, _, event)) in events.iter().enumerate() {
        if event.is_call {
            call_node[event.operation] = position + 1;
        } else {
            return_node[event.operation] = position + 1;
        }
    }
    let event_at = |node: usize| events[node - 1].2;

    let lift = |next: &mut Vec<usize>, previous: &mut Vec<usize>, operation: usize| {
        for node in [call_node[operation], return_node[operation]] {
            let (before, after) = (previous[node], next[node]);
            next[before] = after;
            if after != usize::MAX {
                previous[after] = before;
            }
        }
    };
    let unlift = |next: &mut Vec<usize>, previous: &mut Vec<usize>, operation: usize| {
        for node in [return_node[operation], call_node[operation]] {
            let (before, after) = (previous[node], next[node]);
            next[before] = node;
            if after != usize::MAX {
                previous[after] = node;
            }
        }
    };

    let words = count.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut states: BTreeSet<M::State> = BTreeSet::from([model.init()]);
    let mut cache: HashSet<(Vec<u64>, BTreeSet<M::State>)> = HashSet::new();
    let mut stack: Vec<(usize, BTreeSet<M::State>)> = Vec::new();
    let mut longest: Vec<usize> = Vec::new();
    let mut steps: u64 = 0;
    let mut node = next[0];
    while next[0] != usize::MAX {
        steps += 1;
        if steps > step_budget {
            return Outcome::Unknown { steps };
        }
        let event = event_at(node);
        let waits = |linearized: &[u64]| {
            after[event.operation]
                .is_some_and(|first| linearized[first / 64] & (1 << (first % 64)) == 0)
        };
        if event.is_call && waits(&linearized) {
            node = next[node];
        } else if event.is_call {
            let operation = &operations[event.operation];
            let successors: BTreeSet<M::State> = states
                .iter()
                .flat_map(|state| model.step(state, &operation.input, operation.output.as_ref()))
                .collect();
            let mut advanced = false;
            if !successors.is_empty() {
                linearized[event.operation / 64] |= 1 << (event.operation % 64);
                if cache.insert((linearized.clone(), successors.clone())) {
                    let before = std::mem::replace(&mut states, successors);
                    stack.push((event.operation, before));
                    lift(&mut next, &mut previous, event.operation);
                    if stack.len() > longest.len() {
                        longest = stack.iter().map(|(operation, _)| *operation).collect();
                    }
                    node = next[0];
                    advanced = true;
                } else {
                    linearized[event.operation / 64] &= !(1 << (event.operation % 64));
                }
            }
            if !advanced {
                node = next[node];
            }
        } else {
            // An operation returned before every pending candidate could be linearized: undo
            // the last choice and try the next candidate after it.
            let Some((operation, before)) = stack.pop() else {
                return Outcome::NotLinearizable {
                    longest_prefix: longest,
                };
            };
            states = before;
            linearized[operation / 64] &= !(1 << (operation % 64));
            unlift(&mut next, &mut previous, operation);
            node = next[call_node[operation]];
        }
    }
    Outcome::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register holding one integer; writes answer nothing, reads answer the value.
    struct Register;

    #[derive(Debug)]
    enum RegisterInput {
        Write(u32),
        Read,
    }

    impl Model for Register {
        type State = u32;
        type Input = RegisterInput;
        type Output = u32;

        fn init(&self) -> u32 {
            0
        }

        fn step(&self, state: &u32, input: &RegisterInput, output: Option<&u32>) -> Vec<u32> {
            match input {
                RegisterInput::Write(value) => vec![*value],
                RegisterInput::Read => match output {
                    Some(seen) if seen != state => vec![],
                    _ => vec![*state],
                },
            }
        }
    }

    fn op(
        input: RegisterInput,
        output: Option<u32>,
        invoked: u64,
        returned: Option<u64>,
    ) -> Operation<RegisterInput, u32> {
        Operation {
            client: 0,
            input,
            output,
            invoked,
            returned,
        }
    }

    #[test]
    fn concurrent_write_may_be_seen_or_not() {
        for seen in [0, 1] {
            let history = vec![
                op(RegisterInput::Write(1), Some(0), 0, Some(10)),
                op(RegisterInput::Read, Some(seen), 2, Some(5)),
            ];
            assert_eq!(
                check_operations(&Register, &history, 1_000),
                Outcome::Linearizable
            );
        }
    }

    #[test]
    fn a_read_after_a_completed_write_must_see_it() {
        let history = vec![
            op(RegisterInput::Write(1), Some(0), 0, Some(1)),
            op(RegisterInput::Read, Some(0), 2, Some(3)),
        ];
        assert_eq!(
            check_operations(&Register, &history, 1_000),
            Outcome::NotLinearizable {
                longest_prefix: vec![0]
            }
        );
    }

    #[test]
    fn reads_cannot_flip_back() {
        // Two sequential reads see 1 then 0 while a write of 1 is in flight: the second read
        // would have to precede the first.
        let history = vec![
            op(RegisterInput::Write(1), Some(0), 0, Some(100)),
            op(RegisterInput::Read, Some(1), 10, Some(20)),
            op(RegisterInput::Read, Some(0), 30, Some(40)),
        ];
        assert!(matches!(
            check_operations(&Register, &history, 1_000),
            Outcome::NotLinearizable { .. }
        ));
    }

    #[test]
    fn an_unfinished_write_may_take_effect_late_or_never() {
        let history = vec![
            op(RegisterInput::Write(7), None, 0, None),
            op(RegisterInput::Read, Some(0), 10, Some(20)),
            op(RegisterInput::Read, Some(7), 30, Some(40)),
        ];
        assert_eq!(
            check_operations(&Register, &history, 1_000),
            Outcome::Linearizable
        );
    }

    #[test]
    fn the_step_budget_bounds_the_search() {
        // Many concurrent writes and a read of a value nobody wrote: exhausting every order
        // takes more than a handful of steps.
        let mut history: Vec<_> = (1..=12)
            .map(|value| op(RegisterInput::Write(value), Some(0), 0, Some(100)))
            .collect();
        history.push(op(RegisterInput::Read, Some(99), 0, Some(100)));
        assert!(matches!(
            check_operations(&Register, &history, 50),
            Outcome::Unknown { .. }
        ));
    }
}
