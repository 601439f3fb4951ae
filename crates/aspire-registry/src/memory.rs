//! The in-memory registry: one process's keys in a map, parsed into the same
//! [`ClusterState`] the etcd registry builds, so both behave alike.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use aspire_core::keys::{KeySchema, ModelKey};
use aspire_core::{AspiredVersions, AvailableVersions, ClusterState, ModelName, WorkerRecord};
use async_trait::async_trait;
use tokio::sync::watch;

use crate::{Registry, Result, encode_json};

/// A registry that lives in one process. Cheap to clone handles with `Arc`.
#[derive(Debug)]
pub struct MemoryRegistry {
    schema: KeySchema,
    kvs: Mutex<BTreeMap<String, Vec<u8>>>,
    tx: watch::Sender<Arc<ClusterState>>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new(KeySchema::default())
    }
}

impl MemoryRegistry {
    /// An empty registry under `schema`'s prefix.
    pub fn new(schema: KeySchema) -> Self {
        let (tx, _) = watch::channel(Arc::new(ClusterState::default()));
        Self {
            schema,
            kvs: Mutex::new(BTreeMap::new()),
            tx,
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<u8>>> {
        // A panic while holding this lock cannot leave the map half-updated (each change
        // is one insert or remove), so a poisoned lock is still consistent.
        self.kvs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, key: String, value: Option<Vec<u8>>) {
        let mut kvs = self.lock();
        let changed = match &value {
            Some(v) => kvs.insert(key.clone(), v.clone()).as_ref() != Some(v),
            None => kvs.remove(&key).is_some(),
        };
        if changed {
            // Under the map's lock, so watchers see writes in order.
            self.tx.send_modify(|state| {
                Arc::make_mut(state).apply(&self.schema, &key, value.as_deref());
            });
        }
    }
}

#[async_trait]
impl Registry for MemoryRegistry {
    async fn put_available(&self, model: &ModelName, value: &AvailableVersions) -> Result<()> {
        self.write(
            self.schema.model_key(model, ModelKey::Available),
            Some(encode_json(value)?),
        );
        Ok(())
    }

    async fn put_aspired(&self, model: &ModelName, value: &AspiredVersions) -> Result<()> {
        self.write(
            self.schema.model_key(model, ModelKey::Aspired),
            Some(encode_json(value)?),
        );
        Ok(())
    }

    async fn set_pinned(&self, model: &ModelName, pin: Option<&str>) -> Result<()> {
        let key = self.schema.model_key(model, ModelKey::Pinned);
        self.write(key, pin.map(|p| p.as_bytes().to_vec()));
        Ok(())
    }

    async fn remove_model(&self, model: &ModelName) -> Result<()> {
        self.write(self.schema.model_key(model, ModelKey::Available), None);
        self.write(self.schema.model_key(model, ModelKey::Aspired), None);
        Ok(())
    }

    async fn put_worker(&self, worker_id: &str, record: &WorkerRecord) -> Result<()> {
        self.write(
            self.schema.worker_key(worker_id),
            Some(encode_json(record)?),
        );
        Ok(())
    }

    async fn remove_worker(&self, worker_id: &str) -> Result<()> {
        self.write(self.schema.worker_key(worker_id), None);
        Ok(())
    }

    async fn put_raw(&self, key: &str, value: Option<&[u8]>) -> Result<()> {
        self.write(key.to_string(), value.map(<[u8]>::to_vec));
        Ok(())
    }

    async fn state(&self) -> Result<ClusterState> {
        let kvs = self.lock();
        let mut state = ClusterState::default();
        for (k, v) in kvs.iter() {
            state.apply(&self.schema, k, Some(v));
        }
        Ok(state)
    }

    fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.tx.subscribe()
    }

    fn schema(&self) -> &KeySchema {
        &self.schema
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        crate::conformance::run_all(|prefix| async move {
            Arc::new(MemoryRegistry::new(KeySchema::new(&prefix))) as Arc<dyn Registry>
        })
        .await;
    }
}
