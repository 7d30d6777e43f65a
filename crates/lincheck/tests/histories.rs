//! Hand-made store histories, linearizable and not (stale read, lost update, read-your-write
//! violation, revisions going backwards), and random histories produced by a sequential
//! reference store with overlapping intervals around each operation's linearization point.

use novacron_lincheck::{
    Change, CheckOptions, Condition, KvInput, KvOperation, KvOutput, Observed, Verdict,
    check_history,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

fn write(
    client: u64,
    key: &str,
    conditions: Vec<Condition>,
    changes: Vec<Change>,
    interval: (u64, Option<u64>),
    output: Option<KvOutput>,
) -> KvOperation {
    KvOperation {
        client,
        input: KvInput::Transaction {
            key: key.to_string(),
            conditions,
            changes,
        },
        output,
        invoked: interval.0,
        returned: interval.1,
    }
}

fn succeeded(revision: u64, deleted_keys: u64) -> Option<KvOutput> {
    Some(KvOutput::Transaction {
        succeeded: true,
        revision,
        deleted_keys,
        failed_condition: None,
    })
}

fn put(client: u64, key: &str, value: &str, at: (u64, u64), revision: u64) -> KvOperation {
    write(
        client,
        key,
        vec![],
        vec![Change::Put(value.as_bytes().to_vec())],
        (at.0, Some(at.1)),
        succeeded(revision, 0),
    )
}

fn get(client: u64, key: &str, at: (u64, u64), seen: Option<(&str, u64, u64, u64)>) -> KvOperation {
    KvOperation {
        client,
        input: KvInput::Get {
            key: key.to_string(),
        },
        output: Some(KvOutput::Get(seen.map(
            |(value, create_revision, mod_revision, version)| Observed {
                value: value.as_bytes().to_vec(),
                create_revision,
                mod_revision,
                version,
            },
        ))),
        invoked: at.0,
        returned: Some(at.1),
    }
}

fn check(history: &[KvOperation]) -> Verdict {
    check_history(history, CheckOptions::default()).expect("well-formed history")
}

fn assert_violation_on(history: &[KvOperation], key: &str) {
    match check(history) {
        Verdict::NotLinearizable {
            key: Some(found),
            explanation,
        } => {
            assert_eq!(found, key, "{explanation}");
            assert!(explanation.contains("no linearization"), "{explanation}");
        }
        other => panic!("expected a violation on {key}, got {other:?}"),
    }
}

#[test]
fn concurrent_reads_may_see_an_overlapping_write_or_not() {
    let history = vec![
        put(1, "x", "a", (0, 10), 1),
        put(1, "x", "b", (20, 60), 2),
        get(2, "x", (25, 30), Some(("a", 1, 1, 1))),
        get(3, "x", (26, 35), Some(("b", 1, 2, 2))),
        get(2, "x", (70, 80), Some(("b", 1, 2, 2))),
        put(4, "y", "c", (5, 50), 3),
        get(4, "y", (1, 2), None),
    ];
    assert_eq!(check(&history), Verdict::Linearizable);
}

#[test]
fn a_stale_read_is_caught() {
    let history = vec![
        put(1, "x", "a", (0, 10), 1),
        put(1, "x", "b", (20, 30), 2),
        get(2, "x", (40, 50), Some(("a", 1, 1, 1))),
    ];
    assert_violation_on(&history, "x");
}

#[test]
fn a_lost_update_is_caught() {
    // Both clients compare-and-swap from mod_revision 1 and both are told they won.
    let cas = |client, value: &str, at: (u64, u64), revision| {
        write(
            client,
            "x",
            vec![Condition::ModRevision(1)],
            vec![Change::Put(value.as_bytes().to_vec())],
            (at.0, Some(at.1)),
            succeeded(revision, 0),
        )
    };
    let mut history = vec![
        put(1, "x", "0", (0, 10), 1),
        cas(1, "1", (20, 40), 2),
        cas(2, "2", (25, 45), 3),
    ];
    assert_violation_on(&history, "x");
    // The same with the second swap refused is fine.
    history[2] = write(
        2,
        "x",
        vec![Condition::ModRevision(1)],
        vec![Change::Put(b"2".to_vec())],
        (25, Some(45)),
        Some(KvOutput::Transaction {
            succeeded: false,
            revision: 2,
            deleted_keys: 0,
            failed_condition: Some((0, Some(2))),
        }),
    );
    assert_eq!(check(&history), Verdict::Linearizable);
}

#[test]
fn a_read_your_write_violation_is_caught() {
    // Client 1 writes then reads its own key and does not see its write, although nobody
    // else wrote in between.
    let history = vec![
        put(1, "x", "old", (0, 10), 1),
        put(1, "x", "new", (20, 30), 2),
        get(1, "x", (31, 40), Some(("old", 1, 1, 1))),
    ];
    assert_violation_on(&history, "x");
}

#[test]
fn an_unknown_write_may_appear_later_but_only_once() {
    let unknown = write(
        1,
        "x",
        vec![Condition::Absent],
        vec![Change::Put(b"a".to_vec())],
        (0, None),
        None,
    );
    let mut history = vec![
        unknown,
        get(2, "x", (10, 20), None),
        get(2, "x", (30, 40), Some(("a", 5, 5, 1))),
        put(3, "y", "b", (45, 46), 6),
    ];
    assert_eq!(check(&history), Verdict::Linearizable);
    // The same value later with another revision and no writer in between: impossible.
    history.push(get(2, "x", (50, 60), Some(("a", 7, 7, 1))));
    assert_violation_on(&history, "x");
}

#[test]
fn reads_whose_answers_were_lost_cost_the_search_nothing() {
    // Writes one after another, each read back, and a read with a lost answer started before
    // each write: open to the end of the history, they overlap everything after them.
    let mut history = Vec::new();
    for round in 0..40u64 {
        let at = round * 10 + 1;
        history.push(KvOperation {
            client: 100 + round,
            input: KvInput::Get {
                key: "k".to_string(),
            },
            output: None,
            invoked: at,
            returned: None,
        });
        let value = format!("v{round}");
        history.push(put(1, "k", &value, (at + 1, at + 2), round + 1));
        history.push(get(
            2,
            "k",
            (at + 3, at + 4),
            Some((&value, 1, round + 1, round + 1)),
        ));
    }
    let verdict = check_history(
        &history,
        CheckOptions {
            step_budget_per_key: 10_000,
        },
    )
    .expect("well-formed history");
    assert_eq!(verdict, Verdict::Linearizable);
    // A lost read does not hide a stale one.
    history.push(get(3, "k", (500, 501), Some(("v3", 1, 4, 4))));
    assert_violation_on(&history, "k");
}

fn lost_put(client: u64, key: &str, value: &str, invoked: u64) -> KvOperation {
    write(
        client,
        key,
        vec![],
        vec![Change::Put(value.as_bytes().to_vec())],
        (invoked, None),
        None,
    )
}

#[test]
fn lost_writes_alike_are_searched_as_one_chain() {
    // A put, then thirty puts whose answers were lost (a leader killed under load), then reads
    // that still see the first put: none of the lost ones took effect before them. Each subset
    // of the lost puts taken before a read is a configuration of its own unless alike ones are
    // taken in the order they were invoked.
    let mut history = vec![put(1, "k", "a", (0, 10), 1)];
    for index in 0..30u64 {
        history.push(lost_put(
            10 + index,
            "k",
            &format!("lost{index}"),
            20 + index,
        ));
    }
    for round in 0..5u64 {
        let at = 1_000 + round * 10;
        history.push(get(2, "k", (at, at + 5), Some(("a", 1, 1, 1))));
    }
    let budget = 200_000;
    let options = CheckOptions {
        step_budget_per_key: budget,
    };
    assert!(matches!(
        novacron_lincheck::check_operations(&novacron_lincheck::KeyModel, &history, budget),
        novacron_lincheck::Outcome::Unknown { .. }
    ));
    assert_eq!(
        check_history(&history, options).expect("well-formed history"),
        Verdict::Linearizable
    );
    // Two of them took effect before a last read (version 3): any two fit.
    history.push(get(2, "k", (2_000, 2_005), Some(("lost29", 1, 40, 3))));
    assert_eq!(
        check_history(&history, options).expect("well-formed history"),
        Verdict::Linearizable
    );
    // A read that needs a lost put invoked after it returned is still caught, and so is a read
    // counting more writes than were ever invoked before it.
    let late = vec![
        put(1, "k", "a", (0, 10), 1),
        lost_put(2, "k", "x", 20),
        lost_put(3, "k", "y", 500),
        get(4, "k", (100, 200), Some(("y", 1, 7, 2))),
    ];
    assert_violation_on(&late, "k");
    let too_many = vec![
        put(1, "k", "a", (0, 10), 1),
        lost_put(2, "k", "x", 20),
        lost_put(3, "k", "y", 30),
        lost_put(4, "k", "z", 500),
        get(5, "k", (100, 200), Some(("y", 1, 7, 4))),
    ];
    assert_violation_on(&too_many, "k");
    let enough = vec![
        put(1, "k", "a", (0, 10), 1),
        lost_put(2, "k", "x", 20),
        lost_put(3, "k", "y", 30),
        lost_put(4, "k", "z", 500),
        get(5, "k", (100, 200), Some(("y", 1, 7, 3))),
    ];
    assert_eq!(check(&enough), Verdict::Linearizable);
}

#[test]
fn failed_conditions_must_report_what_the_store_held() {
    let create = |actual| {
        write(
            2,
            "x",
            vec![Condition::Absent],
            vec![Change::Put(b"b".to_vec())],
            (20, Some(30)),
            Some(KvOutput::Transaction {
                succeeded: false,
                revision: 1,
                deleted_keys: 0,
                failed_condition: Some((0, actual)),
            }),
        )
    };
    let history = vec![put(1, "x", "a", (0, 10), 1), create(Some(1))];
    assert_eq!(check(&history), Verdict::Linearizable);
    let history = vec![put(1, "x", "a", (0, 10), 1), create(Some(7))];
    assert_violation_on(&history, "x");
}

#[test]
fn deletes_count_and_revisions_are_checked() {
    let delete = |at: (u64, u64), revision, deleted| {
        write(
            1,
            "x",
            vec![],
            vec![Change::Delete],
            (at.0, Some(at.1)),
            succeeded(revision, deleted),
        )
    };
    let history = vec![
        put(1, "x", "a", (0, 10), 1),
        delete((20, 30), 2, 1),
        delete((40, 50), 2, 0),
        get(2, "x", (60, 70), None),
        put(1, "x", "c", (80, 90), 3),
        get(2, "x", (100, 110), Some(("c", 3, 3, 1))),
    ];
    assert_eq!(check(&history), Verdict::Linearizable);
    // A second delete of the already deleted key cannot have removed it.
    let mut wrong = history[..3].to_vec();
    wrong[2] = delete((40, 50), 3, 1);
    assert_violation_on(&wrong, "x");
}

#[test]
fn revisions_going_backwards_across_keys_are_caught() {
    let history = vec![put(1, "x", "a", (0, 10), 5), put(2, "y", "b", (20, 30), 3)];
    match check(&history) {
        Verdict::NotLinearizable {
            key: None,
            explanation,
        } => {
            assert!(explanation.contains("backwards"), "{explanation}")
        }
        other => panic!("expected a revision violation, got {other:?}"),
    }
    let duplicate = vec![put(1, "x", "a", (0, 10), 4), put(2, "y", "b", (5, 30), 4)];
    assert!(matches!(
        check(&duplicate),
        Verdict::NotLinearizable { key: None, .. }
    ));
}

#[test]
fn malformed_histories_are_refused() {
    let mut backwards = put(1, "x", "a", (10, 10), 1);
    backwards.returned = Some(5);
    assert!(check_history(&[backwards], CheckOptions::default()).is_err());
}

/// A sequential store with a global revision: the reference the random histories come from.
#[derive(Default)]
struct Reference {
    revision: u64,
    keys: BTreeMap<String, Observed>,
}

impl Reference {
    fn apply(&mut self, input: &KvInput) -> KvOutput {
        match input {
            KvInput::Get { key } => KvOutput::Get(self.keys.get(key).cloned()),
            KvInput::Transaction {
                key,
                conditions,
                changes,
            } => {
                let current = self.keys.get(key).map(|observed| observed.mod_revision);
                for (index, condition) in conditions.iter().enumerate() {
                    let holds = match condition {
                        Condition::Absent => current.is_none(),
                        Condition::Exists => current.is_some(),
                        Condition::ModRevision(wanted) => current == Some(*wanted),
                    };
                    if !holds {
                        return KvOutput::Transaction {
                            succeeded: false,
                            revision: self.revision,
                            deleted_keys: 0,
                            failed_condition: Some((index, current)),
                        };
                    }
                }
                let revision = self.revision + 1;
                let mut changed = false;
                let mut deleted = 0;
                for change in changes {
                    match change {
                        Change::Put(value) => {
                            let (create_revision, version) = match self.keys.get(key) {
                                Some(old) => (old.create_revision, old.version + 1),
                                None => (revision, 1),
                            };
                            self.keys.insert(
                                key.clone(),
                                Observed {
                                    value: value.clone(),
                                    create_revision,
                                    mod_revision: revision,
                                    version,
                                },
                            );
                            changed = true;
                        }
                        Change::Delete => {
                            if self.keys.remove(key).is_some() {
                                deleted += 1;
                                changed = true;
                            }
                        }
                    }
                }
                if changed {
                    self.revision = revision;
                }
                KvOutput::Transaction {
                    succeeded: true,
                    revision: self.revision,
                    deleted_keys: deleted,
                    failed_condition: None,
                }
            }
        }
    }
}

fn random_input(random: &mut StdRng, reference: &Reference, serial: usize) -> KvInput {
    let key = format!("k{}", random.random_range(0..3));
    let current = reference
        .keys
        .get(&key)
        .map(|observed| observed.mod_revision);
    let value = format!("v{serial}").into_bytes();
    match random.random_range(0..6) {
        0 | 1 => KvInput::Get { key },
        2 => KvInput::Transaction {
            key,
            conditions: vec![],
            changes: vec![Change::Put(value)],
        },
        3 => KvInput::Transaction {
            key,
            conditions: vec![Condition::Absent],
            changes: vec![Change::Put(value)],
        },
        4 => KvInput::Transaction {
            // Right or wrong expectation, half and half.
            conditions: vec![Condition::ModRevision(match current {
                Some(revision) if random.random_bool(0.5) => revision,
                _ => random.random_range(1..20),
            })],
            key,
            changes: vec![Change::Put(value)],
        },
        _ => KvInput::Transaction {
            key,
            conditions: vec![Condition::Exists],
            changes: vec![Change::Delete],
        },
    }
}

/// Runs `count` random operations through the reference one at a time; operation i takes
/// effect at time 100·i, inside an interval of random width around it. Some writes lose their
/// answer (they still took effect, or, for some, never did).
fn random_history(seed: u64, count: usize) -> Vec<KvOperation> {
    let mut random = StdRng::seed_from_u64(seed);
    let mut reference = Reference::default();
    let mut history = Vec::with_capacity(count);
    for serial in 0..count {
        let input = random_input(&mut random, &reference, serial);
        let point = 1_000 + 100 * serial as u64;
        let invoked = point - random.random_range(0..400);
        let returned = point + random.random_range(0..400);
        let is_write = matches!(input, KvInput::Transaction { .. });
        if is_write && random.random_bool(0.08) {
            // Lost answer; half of these never reached the store.
            if random.random_bool(0.5) {
                reference.apply(&input);
            }
            history.push(KvOperation {
                client: serial as u64 % 5,
                input,
                output: None,
                invoked,
                returned: None,
            });
            continue;
        }
        let output = reference.apply(&input);
        history.push(KvOperation {
            client: serial as u64 % 5,
            input,
            output: Some(output),
            invoked,
            returned: Some(returned),
        });
    }
    history
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn histories_of_a_sequential_store_are_linearizable(seed in any::<u64>()) {
        let history = random_history(seed, 150);
        prop_assert_eq!(check(&history), Verdict::Linearizable);
    }

    #[test]
    fn a_read_of_a_value_never_written_is_caught(seed in any::<u64>()) {
        let mut history = random_history(seed, 150);
        let read = history.iter().position(|operation| {
            matches!(operation.output, Some(KvOutput::Get(Some(_))))
        });
        if let Some(index) = read {
            let key = history[index].input.key().to_string();
            if let Some(KvOutput::Get(Some(observed))) = history[index].output.as_mut() {
                observed.value = b"never written".to_vec();
            }
            match check(&history) {
                Verdict::NotLinearizable { key: Some(found), .. } => prop_assert_eq!(found, key),
                other => prop_assert!(false, "corrupted read not caught: {other:?}"),
            }
        }
    }
}
