//! Turns store changes under `vms/` into VM state events for the API's event stream. Only a
//! change of state (or a deletion) makes an event; status bookkeeping does not.

use crate::records::VM_PREFIX;
use novacron_store::{Store, WatchEvent};
use novacron_types::{VmEvent, VmRecord, VmState, unix_now};
use std::collections::HashMap;
use tokio::sync::broadcast;

pub(crate) async fn publish(store: Store, sender: broadcast::Sender<VmEvent>) {
    loop {
        let listing = match store
            .list(VM_PREFIX, novacron_store::Consistency::Local)
            .await
        {
            Ok(listing) => listing,
            Err(error) => {
                tracing::warn!(%error, "event stream cannot list vms; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut last_state: HashMap<String, VmState> = listing
            .items
            .iter()
            .filter_map(|item| {
                let record: VmRecord = serde_json::from_slice(&item.value).ok()?;
                Some((item.key.clone(), record.status.state))
            })
            .collect();
        let mut watcher = match store.watch(VM_PREFIX, listing.revision + 1) {
            Ok(watcher) => watcher,
            Err(error) => {
                tracing::warn!(%error, "event stream cannot watch vms; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let change = match watcher.next().await {
                Ok(change) => change,
                Err(error) => {
                    tracing::info!(%error, "vm event watch ended; re-listing");
                    break;
                }
            };
            let vm = change.key().trim_start_matches(VM_PREFIX).to_string();
            let event = match &change {
                WatchEvent::Put { key_value } => {
                    let Ok(record) = serde_json::from_slice::<VmRecord>(&key_value.value) else {
                        continue;
                    };
                    let state = record.status.state;
                    if last_state.insert(key_value.key.clone(), state) == Some(state) {
                        continue;
                    }
                    VmEvent {
                        revision: change.revision(),
                        vm,
                        state: Some(state),
                        reason: record.status.reason.clone(),
                        at: unix_now(),
                    }
                }
                WatchEvent::Delete { key, revision } => {
                    last_state.remove(key);
                    VmEvent {
                        revision: *revision,
                        vm,
                        state: None,
                        reason: None,
                        at: unix_now(),
                    }
                }
            };
            // No subscriber is fine: events are only for whoever listens now.
            let _ = sender.send(event);
        }
    }
}
