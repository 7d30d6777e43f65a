//! Values built once per key, shared while in use and kept a while after: a migration's page
//! indexes (a base image's, a kernel's), which the next migrations of VMs on the same image or
//! kernel would otherwise build again.
//!
//! Each key has its own lock: callers asking for one key while it is being built wait for that
//! build and share its value; callers asking for another key do not wait.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// See the module's documentation.
#[derive(Debug)]
pub struct KeptCache<K, V> {
    slots: std::sync::Mutex<HashMap<K, Arc<Slot<V>>>>,
    keep: Duration,
}

#[derive(Debug)]
struct Slot<V> {
    value: tokio::sync::Mutex<Weak<V>>,
}

impl<K, V> KeptCache<K, V>
where
    K: Eq + Hash,
    V: Send + Sync + 'static,
{
    /// A cache whose values stay in memory for `keep` after each time they are handed out.
    pub fn new(keep: Duration) -> Self {
        Self {
            slots: std::sync::Mutex::new(HashMap::new()),
            keep,
        }
    }

    /// The value for `key`: the one in use or kept, else what `build` makes (an error is
    /// returned and nothing kept; the next caller builds again).
    pub async fn get_or_build<E, F, Fut>(&self, key: K, build: F) -> Result<Arc<V>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Arc<V>, E>>,
    {
        let slot = {
            let mut slots = self
                .slots
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            // Slots nobody waits on whose value is gone.
            slots.retain(|_, slot| {
                Arc::strong_count(slot) > 1
                    || slot
                        .value
                        .try_lock()
                        .map_or(true, |value| value.strong_count() > 0)
            });
            slots
                .entry(key)
                .or_insert_with(|| {
                    Arc::new(Slot {
                        value: tokio::sync::Mutex::new(Weak::new()),
                    })
                })
                .clone()
        };
        let mut value = slot.value.lock().await;
        let shared = match value.upgrade() {
            Some(shared) => shared,
            None => {
                let built = build().await?;
                *value = Arc::downgrade(&built);
                built
            }
        };
        drop(value);
        let kept = shared.clone();
        let keep = self.keep;
        tokio::spawn(async move {
            tokio::time::sleep(keep).await;
            drop(kept);
        });
        Ok(shared)
    }

    /// Keys with a slot (tests).
    #[cfg(test)]
    fn slot_count(&self) -> usize {
        self.slots.lock().map(|slots| slots.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn callers_of_one_key_share_one_build_and_another_key_does_not_wait() {
        let cache = Arc::new(KeptCache::<&'static str, String>::new(Duration::from_secs(
            600,
        )));
        let builds = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let slow = |builds: Arc<AtomicUsize>, mut released: tokio::sync::watch::Receiver<bool>| {
            move || async move {
                builds.fetch_add(1, Ordering::SeqCst);
                released.wait_for(|released| *released).await.expect("open");
                Ok::<_, ()>(Arc::new("kernel".to_string()))
            }
        };
        let first = tokio::spawn({
            let (cache, builds, released) = (cache.clone(), builds.clone(), released.clone());
            async move { cache.get_or_build("kernel", slow(builds, released)).await }
        });
        let second = tokio::spawn({
            let (cache, builds, released) = (cache.clone(), builds.clone(), released.clone());
            async move { cache.get_or_build("kernel", slow(builds, released)).await }
        });
        // While "kernel" is being built, another key is built and returned.
        tokio::time::timeout(Duration::from_secs(5), async {
            while builds.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first build starts");
        let other = tokio::time::timeout(
            Duration::from_secs(5),
            cache.get_or_build("initrd", || async {
                Ok::<_, ()>(Arc::new("initrd".into()))
            }),
        )
        .await
        .expect("another key does not wait for the build in progress")
        .expect("built");
        assert_eq!(*other, "initrd");
        release.send(true).expect("waiting");
        let (first, second) = (
            first.await.unwrap().unwrap(),
            second.await.unwrap().unwrap(),
        );
        assert!(Arc::ptr_eq(&first, &second), "one value shared");
        assert_eq!(builds.load(Ordering::SeqCst), 1, "built once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_value_is_kept_after_use_then_dropped_and_built_again() {
        let cache = KeptCache::<u32, u32>::new(Duration::from_secs(600));
        let builds = AtomicUsize::new(0);
        let build = || async {
            builds.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(Arc::new(7))
        };
        drop(cache.get_or_build(1, build).await.unwrap());
        tokio::time::sleep(Duration::from_secs(300)).await;
        drop(cache.get_or_build(1, build).await.unwrap());
        assert_eq!(builds.load(Ordering::SeqCst), 1, "kept within ten minutes");
        tokio::time::sleep(Duration::from_secs(601)).await;
        // The keeping tasks ran: the value is gone, and so is its slot on the next call.
        drop(cache.get_or_build(2, build).await.unwrap());
        assert_eq!(cache.slot_count(), 1, "the first key's slot was dropped");
        drop(cache.get_or_build(1, build).await.unwrap());
        assert_eq!(
            builds.load(Ordering::SeqCst),
            3,
            "built again after the keep"
        );
    }

    #[tokio::test]
    async fn a_failed_build_keeps_nothing() {
        let cache = KeptCache::<u32, u32>::new(Duration::from_secs(600));
        let failed = cache
            .get_or_build(1, || async { Err::<Arc<u32>, _>("unreadable") })
            .await;
        assert_eq!(failed.unwrap_err(), "unreadable");
        let built = cache
            .get_or_build(1, || async { Ok::<_, &str>(Arc::new(3)) })
            .await
            .unwrap();
        assert_eq!(*built, 3);
    }
}
