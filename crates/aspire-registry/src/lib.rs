//! The registry: what Aspire's roles tell each other. Discovery publishes each model's
//! available and aspired versions, operators pin versions, workers register their address
//! and each version's state. Every role reads the parsed [`ClusterState`] through a watch,
//! so it reacts to a change at once.
//!
//! [`Registry`] is the seam: [`MemoryRegistry`] serves one process (`aspire-server`, unit
//! tests), the etcd implementation serves a cluster, and both pass [`conformance`]. No role
//! knows which one it talks to. Keys and values follow [`aspire_core::keys`].

pub mod cli;
pub mod conformance;
pub mod etcd;
pub mod etcd_cluster;
pub mod etcd_server;
mod memory;
pub mod tcp_proxy;

use std::sync::Arc;

use aspire_core::{AspiredVersions, AvailableVersions, ClusterState, ModelName, WorkerRecord};
use async_trait::async_trait;
use tokio::sync::watch;

pub use etcd::{EtcdAuth, EtcdOptions, EtcdRegistry, EtcdSecurity, EtcdTls};
pub use memory::MemoryRegistry;
pub use tcp_proxy::{ProxyMode, TcpProxy};

/// Why a registry call failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The backing store could not be reached; the caller keeps what it last knew.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// A value could not be encoded.
    #[error("registry value could not be encoded: {0}")]
    Encode(String),
    /// The store refused this client: wrong credentials, or its roles do not permit the
    /// call. Retrying with the same settings does not help.
    #[error("registry access denied: {0}")]
    Denied(String),
    /// The connection settings contradict each other or name a file that cannot be used.
    #[error("invalid registry settings: {0}")]
    Config(String),
}

/// Result of registry calls.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// What the roles tell each other. Writes are visible to every subscriber of the same
/// registry (for etcd: of the same cluster and prefix) shortly after they return.
#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Publishes every complete version of `model` found in storage (discovery).
    async fn put_available(&self, model: &ModelName, value: &AvailableVersions) -> Result<()>;

    /// Publishes the versions `model`'s version policy selects (discovery).
    async fn put_aspired(&self, model: &ModelName, value: &AspiredVersions) -> Result<()>;

    /// Sets (`Some("1,2")`) or clears (`None`) an operator's pin of `model`. The text is
    /// stored as given; readers validate it (see [`aspire_core::records::parse_pin`]).
    async fn set_pinned(&self, model: &ModelName, pin: Option<&str>) -> Result<()>;

    /// Removes the `available` and `aspired` keys of a model that left the config; an
    /// operator's pin stays.
    async fn remove_model(&self, model: &ModelName) -> Result<()>;

    /// Registers or updates a worker. The record lives as long as the registration (for
    /// etcd: this client's lease), so a worker that dies disappears by itself.
    async fn put_worker(&self, worker_id: &str, record: &WorkerRecord) -> Result<()>;

    /// Deregisters a worker (on graceful shutdown).
    async fn remove_worker(&self, worker_id: &str) -> Result<()>;

    /// Writes a raw key under the prefix, as `etcdctl put` would (`None` deletes it).
    /// Roles never call this; it exists for operators' tools and tests of bad keys.
    async fn put_raw(&self, key: &str, value: Option<&[u8]>) -> Result<()>;

    /// Reads every key under the prefix afresh and parses it.
    async fn state(&self) -> Result<ClusterState>;

    /// A watch on the parsed state; it holds the latest state and changes with every write.
    fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>>;

    /// The key prefix this registry works under.
    fn schema(&self) -> &aspire_core::keys::KeySchema;
}

/// Encodes a record as the JSON stored under its key.
pub fn encode_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| RegistryError::Encode(e.to_string()))
}
