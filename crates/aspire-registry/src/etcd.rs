//! The etcd registry: the [`Registry`] a cluster's roles share. Writes go straight to
//! etcd; worker records live under this client's lease (module `lease`); a background
//! watch keeps the parsed [`ClusterState`] current across etcd restarts, compactions and
//! members that lose their leader (module `watcher`). Every etcd call is bounded by
//! [`EtcdOptions::op_timeout`], so an etcd that went away never hangs a caller, and
//! every call requires the member to have a leader; the client uses one endpoint at a
//! time and moves to the next when it fails (module `conn`).

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
    /// [`RegistryError::Unavailable`] (a call that fails fast on one endpoint is tried on
    /// the next within the same bound).
    pub op_timeout: Duration,
    /// While keep-alives or re-registrations fail, how soon the lease task tries again
    /// (instead of a third of [`Self::lease_ttl`]), so a worker whose lease expired while
    /// etcd was away registers again as soon as etcd answers.
    pub retry_interval: Duration,
    /// How often the watch asks etcd for a progress report and its member for a leader.
    pub progress_interval: Duration,
    /// A watch stream that brings no message of any kind this long is broken: the client
    /// moves to its next endpoint, lists the prefix again and watches anew.
    pub stall_timeout: Duration,
    /// Most keys per page when listing the prefix.
    pub list_page_size: u32,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(10),
            op_timeout: Duration::from_secs(5),
            retry_interval: Duration::from_millis(500),
            progress_interval: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(5),
            list_page_size: 100,
        }
    }
}

impl EtcdOptions {
    fn tuning(&self) -> watcher::WatchTuning {
        watcher::WatchTuning {
            page_size: self.list_page_size.max(1),
            progress_interval: self.progress_interval.max(Duration::from_millis(10)),
            stall_timeout: self.stall_timeout.max(Duration::from_millis(10)),
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
    tuning: watcher::WatchTuning,
    stats: Arc<watcher::WatchStats>,
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
        let tuning = options.tuning();
        let (state, revision) = watcher::list(&conn, &schema, tuning.page_size).await?;
        let tx = Arc::new(watch::Sender::new(Arc::new(state)));
        let cancel = CancellationToken::new();
        let stats = Arc::new(watcher::WatchStats::default());
        let workers = Arc::new(WorkerLease::new(
            conn.clone(),
            options.lease_ttl,
            options.retry_interval,
        ));
        tokio::spawn(watcher::run(
            conn.clone(),
            schema.clone(),
            tx.clone(),
            revision,
            tuning,
            stats.clone(),
            cancel.clone(),
        ));
        tokio::spawn(workers.clone().keep_alive(cancel.clone()));
        Ok(Self {
            conn,
            schema,
            tx,
            workers,
            tuning,
            stats,
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

    /// The endpoint this registry uses now (it moves to the next one when this one fails
    /// or loses its leader).
    pub fn current_endpoint(&self) -> String {
        self.conn.current_endpoint()
    }

    /// How many watch streams this registry has opened: 1 until a watch first broke.
    pub fn watch_streams_opened(&self) -> u64 {
        self.stats
            .streams
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn put(&self, key: String, value: Vec<u8>) -> Result<()> {
        self.conn
            .call(&format!("put {key}"), |s| {
                let (key, value) = (key.clone(), value.clone());
                async move { s.kv().put(key, value, None).await }
            })
            .await
            .map(drop)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.conn
            .call(&format!("delete {key}"), |s| {
                let key = key.to_string();
                async move { s.kv().delete(key, None).await }
            })
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
        let keys = [
            self.schema.model_key(model, ModelKey::Available),
            self.schema.model_key(model, ModelKey::Aspired),
        ];
        self.conn
            .call(&format!("remove model {model}"), |s| {
                let txn = Txn::new().and_then(keys.clone().map(|k| TxnOp::delete(k, None)));
                async move { s.kv().txn(txn).await }
            })
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
        watcher::list(&self.conn, &self.schema, self.tuning.page_size)
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
