//! The etcd registry: the [`Registry`] a cluster's roles share. Writes go straight to
//! etcd; worker records live under this client's lease (module `lease`); a background
//! watch keeps the parsed [`ClusterState`] current across etcd restarts (module
//! `watcher`). Every etcd call is bounded by [`EtcdOptions::op_timeout`], so an etcd that
//! went away never hangs a caller.

mod conn;
mod lease;
mod security;
mod watcher;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aspire_core::keys::{KeySchema, ModelKey};
use aspire_core::{AspiredVersions, AvailableVersions, ClusterState, ModelName, WorkerRecord};
use async_trait::async_trait;
use etcd_client::{Txn, TxnOp};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{Registry, RegistryError, Result, encode_json};
use conn::Conn;
use lease::WorkerLease;
pub(crate) use security::is_https;
pub use security::{EtcdAuth, EtcdSecurity, EtcdTls};

/// How an [`EtcdRegistry`] talks to etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Time to live of the lease worker records live under: a worker that dies without
    /// deregistering disappears this long after its last keep-alive. Kept alive every
    /// third of it.
    pub lease_ttl: Duration,
    /// The most any one etcd call may take before it fails with
    /// [`RegistryError::Unavailable`].
    pub op_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            op_timeout: Duration::from_secs(5),
        }
    }
}

/// A [`Registry`] on an etcd cluster, under one [`KeySchema`] prefix.
///
/// Dropping it stops its background tasks without revoking its lease, as a crash would:
/// its worker records vanish when the lease expires. Call [`EtcdRegistry::close`] on a
/// graceful shutdown to remove them at once.
pub struct EtcdRegistry {
    conn: Conn,
    schema: KeySchema,
    tx: Arc<watch::Sender<Arc<ClusterState>>>,
    workers: Arc<WorkerLease>,
    cancel: CancellationToken,
}

impl fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &self.conn.endpoints())
            .field("prefix", &self.schema.prefix())
            .finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    /// Connects to etcd at `endpoints` (`http://host:port`) over plaintext without
    /// credentials, checks that one answers, reads every key under `schema`'s prefix and
    /// starts watching it. Fails with a sentence naming the endpoints when none answers
    /// within `options.op_timeout`.
    pub async fn connect(
        endpoints: &[String],
        schema: KeySchema,
        options: EtcdOptions,
    ) -> Result<Self> {
        Self::connect_with_security(endpoints, schema, options, &EtcdSecurity::default()).await
    }

    /// Like [`Self::connect`], with TLS (`https://` endpoints) and an etcd user as
    /// `security` says. Fails with [`RegistryError::Config`] when the endpoints and the
    /// TLS settings disagree, [`RegistryError::Denied`] when etcd refuses the user, and
    /// [`RegistryError::Unavailable`] (naming TLS when that is the cause) otherwise.
    pub async fn connect_with_security(
        endpoints: &[String],
        schema: KeySchema,
        options: EtcdOptions,
        security: &EtcdSecurity,
    ) -> Result<Self> {
        let conn = Conn::connect(endpoints, options.op_timeout, security).await?;
        // Read before the first subscriber exists, so no role ever sees an empty state
        // that only means "not listed yet" (a router would think no worker is up).
        let (state, revision) = watcher::list(&conn, &schema).await?;
        let tx = Arc::new(watch::Sender::new(Arc::new(state)));
        let cancel = CancellationToken::new();
        let workers = Arc::new(WorkerLease::new(conn.clone(), options.lease_ttl));
        tokio::spawn(watcher::run(
            conn.clone(),
            schema.clone(),
            tx.clone(),
            revision,
            cancel.clone(),
        ));
        tokio::spawn(workers.clone().keep_alive(cancel.clone()));
        Ok(Self {
            conn,
            schema,
            tx,
            workers,
            cancel,
        })
    }

    /// Graceful shutdown: revokes the lease, so this registry's worker records vanish at
    /// once, and stops the background tasks (subscribers keep the last state). Later
    /// [`Registry::put_worker`] calls fail; other calls still work.
    pub async fn close(&self) -> Result<()> {
        self.cancel.cancel();
        self.workers.close().await
    }

    /// The etcd endpoints this registry talks to, comma-separated.
    pub fn endpoints(&self) -> &str {
        self.conn.endpoints()
    }

    async fn put(&self, key: String, value: Vec<u8>) -> Result<()> {
        let mut kv = self.conn.client().kv_client();
        self.conn
            .call(&format!("put {key}"), kv.put(key.as_bytes(), value, None))
            .await
            .map(drop)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let mut kv = self.conn.client().kv_client();
        self.conn
            .call(&format!("delete {key}"), kv.delete(key, None))
            .await
            .map(drop)
    }
}

impl Drop for EtcdRegistry {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[async_trait]
impl Registry for EtcdRegistry {
    async fn put_available(&self, model: &ModelName, value: &AvailableVersions) -> Result<()> {
        let key = self.schema.model_key(model, ModelKey::Available);
        self.put(key, encode_json(value)?).await
    }

    async fn put_aspired(&self, model: &ModelName, value: &AspiredVersions) -> Result<()> {
        let key = self.schema.model_key(model, ModelKey::Aspired);
        self.put(key, encode_json(value)?).await
    }

    async fn set_pinned(&self, model: &ModelName, pin: Option<&str>) -> Result<()> {
        let key = self.schema.model_key(model, ModelKey::Pinned);
        match pin {
            Some(pin) => self.put(key, pin.as_bytes().to_vec()).await,
            None => self.delete(&key).await,
        }
    }

    async fn remove_model(&self, model: &ModelName) -> Result<()> {
        // One transaction, so watchers see the model lose both keys in one change rather
        // than an intermediate state with aspired versions but nothing available.
        let txn = Txn::new().and_then([
            TxnOp::delete(self.schema.model_key(model, ModelKey::Available), None),
            TxnOp::delete(self.schema.model_key(model, ModelKey::Aspired), None),
        ]);
        let mut kv = self.conn.client().kv_client();
        self.conn
            .call(&format!("remove model {model}"), kv.txn(txn))
            .await
            .map(drop)
    }

    async fn put_worker(&self, worker_id: &str, record: &WorkerRecord) -> Result<()> {
        let value = encode_json(record)?;
        self.workers
            .put(self.schema.worker_key(worker_id), value)
            .await
    }

    async fn remove_worker(&self, worker_id: &str) -> Result<()> {
        self.workers
            .remove(&self.schema.worker_key(worker_id))
            .await
    }

    async fn put_raw(&self, key: &str, value: Option<&[u8]>) -> Result<()> {
        match value {
            Some(v) => self.put(key.to_string(), v.to_vec()).await,
            None => self.delete(key).await,
        }
    }

    async fn state(&self) -> Result<ClusterState> {
        watcher::list(&self.conn, &self.schema)
            .await
            .map(|(state, _)| state)
    }

    fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.tx.subscribe()
    }

    fn schema(&self) -> &KeySchema {
        &self.schema
    }
}

/// The error of a registry used after [`EtcdRegistry::close`].
fn closed() -> RegistryError {
    RegistryError::Unavailable(
        "this registry was closed; connect a new one to register workers".to_string(),
    )
}
