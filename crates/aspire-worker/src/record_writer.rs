//! Writes this worker's registry record from a task of its own, so that loads, swaps
//! and unloads never wait for etcd.
//!
//! The version manager hands over what the record should be now (a tokio `watch` holds
//! only the latest value); the writer puts it, and while the registry fails or hangs it
//! tries again about every second, always with the newest value, so a slow etcd
//! coalesces many changes into one write. Removal (deregistration) goes through the
//! same channel: once asked, no record is put again, and the writer stops once the
//! removal is done.

use std::sync::Arc;
use std::time::Duration;

use aspire_core::WorkerRecord;
use aspire_registry::Registry;
use tokio::sync::watch;

/// How long one registry write may take before the writer gives up on it and tries
/// again (with the newest value): a hung connection must not freeze the record.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between failed writes.
const RETRY: Duration = Duration::from_secs(1);

/// What the registry should hold for this worker.
#[derive(Debug, Clone, PartialEq)]
enum Wanted {
    Put(WorkerRecord),
    Removed,
}

/// The version manager's handle on the writer task.
#[derive(Debug)]
pub struct RecordWriter {
    wanted: watch::Sender<Option<Wanted>>,
    removed: watch::Receiver<bool>,
}

impl RecordWriter {
    /// Starts the writer task for `worker_id` on the current tokio runtime. It ends once
    /// the record is removed, or when this handle is dropped and nothing is left to write.
    pub fn start(registry: Arc<dyn Registry>, worker_id: String) -> Self {
        let (wanted, wanted_rx) = watch::channel(None);
        let (removed_tx, removed) = watch::channel(false);
        tokio::spawn(write_loop(registry, worker_id, wanted_rx, removed_tx));
        Self { wanted, removed }
    }

    /// Asks for `record` to be written; returns at once. Ignored once removal was asked.
    pub fn put(&self, record: WorkerRecord) {
        let mut record = Some(record);
        self.wanted.send_if_modified(|wanted| match wanted {
            Some(Wanted::Removed) => false,
            Some(Wanted::Put(current)) if Some(&*current) == record.as_ref() => false,
            _ => {
                *wanted = record.take().map(Wanted::Put);
                true
            }
        });
    }

    /// Asks for the record to be removed, and for no record to be written again;
    /// returns at once.
    pub fn remove(&self) {
        self.wanted.send_if_modified(|wanted| {
            let changed = *wanted != Some(Wanted::Removed);
            *wanted = Some(Wanted::Removed);
            changed
        });
    }

    /// Whether the removal is done.
    pub fn is_removed(&self) -> bool {
        *self.removed.borrow()
    }

    /// Waits until the removal is done, at most `limit`; true if it is.
    pub async fn removed_within(&self, limit: Duration) -> bool {
        let mut removed = self.removed.clone();
        tokio::time::timeout(limit, removed.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn write_loop(
    registry: Arc<dyn Registry>,
    worker_id: String,
    mut wanted: watch::Receiver<Option<Wanted>>,
    removed: watch::Sender<bool>,
) {
    let mut written: Option<Wanted> = None;
    loop {
        let next = wanted.borrow_and_update().clone();
        if next.is_some() && next != written {
            let attempt = async {
                match &next {
                    Some(Wanted::Put(record)) => registry.put_worker(&worker_id, record).await,
                    _ => registry.remove_worker(&worker_id).await,
                }
            };
            match tokio::time::timeout(WRITE_TIMEOUT, attempt).await {
                Ok(Ok(())) => {
                    if next == Some(Wanted::Removed) {
                        removed.send_replace(true);
                        return;
                    }
                    written = next;
                    continue;
                }
                Ok(Err(e)) => tracing::warn!("could not write this worker's record: {e}"),
                Err(_) => tracing::warn!(
                    "writing this worker's record took over {WRITE_TIMEOUT:?}; trying again"
                ),
            }
            // Kept to the newest value: whatever arrives meanwhile is what is tried next.
            tokio::time::sleep(RETRY).await;
            if wanted.has_changed().is_err() && next != Some(Wanted::Removed) {
                // The manager is gone and never asked for removal: nothing more to do
                // (the record expires with the registry's lease).
                return;
            }
            continue;
        }
        if wanted.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspire_registry::MemoryRegistry;

    fn record(address: &str) -> WorkerRecord {
        WorkerRecord {
            address: address.to_string(),
            device: "cpu".to_string(),
            ..Default::default()
        }
    }

    async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
        let limit = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(t) = probe().await {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < limit,
                "never happened: {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn writes_the_latest_record_then_removes_it_for_good() {
        let registry = Arc::new(MemoryRegistry::default());
        let writer = RecordWriter::start(registry.clone(), "w".into());
        writer.put(record("a:1"));
        writer.put(record("a:2"));
        eventually("the latest record is written", async || {
            let state = registry.state().await.ok()?;
            (state.workers.get("w")?.address == "a:2").then_some(())
        })
        .await;
        writer.remove();
        writer.put(record("a:3"));
        assert!(writer.removed_within(Duration::from_secs(20)).await);
        assert!(writer.is_removed());
        assert!(registry.state().await.unwrap().workers.is_empty());
    }
}
