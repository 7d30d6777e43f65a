//! Recording a history from concurrent clients: each operation is stamped on invocation and
//! on completion from one monotonic clock shared by every client, in nanoseconds since the
//! recorder was made. An operation whose outcome is unknown is kept without a return time.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::checker::Operation;

/// Collects operations from many clients (clone it freely; clones share the history).
#[derive(Debug)]
pub struct Recorder<I, O> {
    start: Instant,
    operations: Arc<Mutex<Vec<Operation<I, O>>>>,
}

/// An operation that was invoked and has not been recorded yet.
#[derive(Debug)]
#[must_use = "complete, mark as unknown or discard the operation"]
pub struct Pending<I, O> {
    recorder: Recorder<I, O>,
    client: u64,
    input: I,
    invoked: u64,
}

impl<I, O> Clone for Recorder<I, O> {
    fn clone(&self) -> Self {
        Self {
            start: self.start,
            operations: Arc::clone(&self.operations),
        }
    }
}

impl<I, O> Default for Recorder<I, O> {
    fn default() -> Self {
        Self::new()
    }
}

impl<I, O> Recorder<I, O> {
    /// An empty history whose clock starts now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            operations: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Stamps the invocation of `input` by `client`; call just before sending the request.
    pub fn invoke(&self, client: u64, input: I) -> Pending<I, O> {
        Pending {
            recorder: self.clone(),
            client,
            input,
            invoked: self.now(),
        }
    }

    fn push(&self, operation: Operation<I, O>) {
        let mut operations = match self.operations.lock() {
            Ok(operations) => operations,
            Err(poisoned) => poisoned.into_inner(),
        };
        operations.push(operation);
    }

    /// Number of operations recorded so far.
    pub fn len(&self) -> usize {
        match self.operations.lock() {
            Ok(operations) => operations.len(),
            Err(poisoned) => poisoned.into_inner().len(),
        }
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<I: Clone, O: Clone> Recorder<I, O> {
    /// The operations recorded so far, in completion order.
    pub fn history(&self) -> Vec<Operation<I, O>> {
        match self.operations.lock() {
            Ok(operations) => operations.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl<I, O> Pending<I, O> {
    /// Records the answer; call as soon as it arrives.
    pub fn complete(self, output: O) {
        let returned = self.recorder.now();
        self.recorder.push(Operation {
            client: self.client,
            input: self.input,
            output: Some(output),
            invoked: self.invoked,
            returned: Some(returned),
        });
    }

    /// Records that the outcome is unknown: the operation may take effect at any later time.
    pub fn unknown(self) {
        self.recorder.push(Operation {
            client: self.client,
            input: self.input,
            output: None,
            invoked: self.invoked,
            returned: None,
        });
    }

    /// Drops an operation known to have had no effect (a refused request, a failed read).
    pub fn discard(self) {}
}
