//! The version manager: makes the loaded versions follow the registry.
//!
//! Desired versions are the pinned ones when the pin is valid, else the aspired ones.
//! A desired version is fetched from storage into a local cache directory, loaded into
//! LibTorch and warmed up, and only then becomes AVAILABLE. A version that is no longer
//! desired is unloaded only once a desired version of the same model is AVAILABLE
//! (availability-preserving, so serving never stops during a swap or a rollback), and only
//! after the requests in flight on it finish. A failed load is reported in the version's
//! status, the older versions keep serving, and the load is retried with backoff. A
//! version whose location is not under the worker's storage roots ([`StorageRoots`]) is
//! never fetched: it is reported END with the refusal, and not tried again until its
//! location in the registry changes.
//!
//! After its grace, an unloading version waits for its requests in flight at most the
//! drain limit; then the requests still queued or running on it are answered at once
//! with a retryable error, and it is dropped (END), its memory freed when its last
//! forward pass returns. A forward pass running past the slow-pass threshold shows in
//! the metrics and in this worker's record.
//!
//! One task (the actor) owns all mutable state; load and unload tasks report back to it
//! over a channel, and the record goes to the registry through a writer task of its own
//! ([`RecordWriter`]), so the actor never waits for etcd. Request handlers read an
//! immutable [`ServingTable`] snapshot through an `ArcSwap`, so the hot path takes no
//! lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aspire_core::records::{VersionState, VersionStatus};
use aspire_core::{
    AvailableVersions, ClusterState, ModelName, Signature, SignatureMap, SlowPasses, Version,
    WorkerRecord,
};
use aspire_discovery::DiscoveryError;
use aspire_registry::Registry;
use aspire_telemetry::metrics::{RequestMetrics, VersionMetrics, WorkerMetrics};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::batcher::{BatchConfig, BatchPool, Batcher, PassWatch};
use crate::error::WorkerError;
use crate::model::{DeviceSpec, Servable, TorchModel};
use crate::record_writer::RecordWriter;
use crate::storage_roots::{CheckedLocation, LocationError, StorageRoots};

/// What the version manager needs to know.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// This worker's id in the registry.
    pub worker_id: String,
    /// The gRPC address others reach this worker at.
    pub advertise_address: String,
    /// Where models run.
    pub device: DeviceSpec,
    /// How each version's requests are batched.
    pub batching: BatchConfig,
    /// Batch sizes to warm each version up at before it is AVAILABLE.
    pub warmup_batch_sizes: Vec<usize>,
    /// Local directory versions are copied into before loading.
    pub cache_dir: PathBuf,
    /// The only places versions are loaded from; a location elsewhere is refused.
    pub storage_roots: StorageRoots,
    /// Delay before the first retry of a failed load; doubles per failure.
    pub load_retry_initial: Duration,
    /// Longest delay between retries.
    pub load_retry_max: Duration,
    /// How long a version that is no longer desired keeps answering requests that name
    /// it, after it is reported UNLOADING (routers choose versions from what they last
    /// saw, so they need a moment to see the change).
    pub unload_grace: Duration,
    /// How long, after the grace, an unloading version waits for its requests in flight
    /// before it answers them with a retryable error and is dropped
    /// (`--unload-drain-seconds`).
    pub unload_drain: Duration,
    /// A forward pass running longer than this is reported as slow
    /// (`--slow-pass-seconds`); zero reports none.
    pub slow_pass: Duration,
    /// Where loads, versions and their requests are measured.
    pub metrics: WorkerMetrics,
    /// The batch threads every version's batches run on; `None` gives each version
    /// `batching.num_batch_threads` threads of its own.
    pub batch_pool: Option<Arc<BatchPool>>,
}

/// A version loaded into LibTorch with its batcher.
pub struct LoadedVersion {
    /// The model.
    pub model: ModelName,
    /// The version.
    pub version: Version,
    /// Its signatures, as published.
    pub signatures: SignatureMap,
    by_name: BTreeMap<String, Arc<Signature>>,
    /// Its queue and batch threads.
    pub batcher: Batcher,
    /// Its Predict requests' counts and latencies.
    pub requests: RequestMetrics,
}

impl LoadedVersion {
    /// Wraps a loaded model; starts its batcher.
    pub fn new(
        model: ModelName,
        version: Version,
        signatures: SignatureMap,
        servable: Arc<dyn Servable>,
        batching: BatchConfig,
    ) -> Self {
        let metrics = VersionMetrics::detached();
        Self::with_metrics(
            model, version, signatures, servable, batching, metrics, None,
        )
    }

    /// [`Self::new`], measured with `metrics`, its batches run by `pool` (shared with the
    /// other versions) or, without one, by threads of its own.
    pub fn with_metrics(
        model: ModelName,
        version: Version,
        signatures: SignatureMap,
        servable: Arc<dyn Servable>,
        batching: BatchConfig,
        metrics: VersionMetrics,
        pool: Option<&BatchPool>,
    ) -> Self {
        let by_name = signatures
            .signatures
            .iter()
            .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
            .collect();
        Self {
            model,
            version,
            signatures,
            by_name,
            batcher: Batcher::with_metrics(servable, batching, metrics.batch, pool),
            requests: metrics.requests,
        }
    }

    /// Resolves a request's signature name (empty: the default one).
    pub fn signature(&self, requested: &str) -> Result<(String, Arc<Signature>), WorkerError> {
        let (name, _) = self
            .signatures
            .resolve(requested)
            .map_err(WorkerError::InvalidArgument)?;
        let sig = self
            .by_name
            .get(name)
            .cloned()
            .ok_or_else(|| WorkerError::Internal(format!("signature '{name}' vanished")))?;
        Ok((name.to_string(), sig))
    }
}

/// What one model looks like to request handlers.
#[derive(Default, Clone)]
pub struct ModelEntry {
    /// AVAILABLE versions.
    pub loaded: BTreeMap<Version, Arc<LoadedVersion>>,
    /// UNLOADING versions still answering requests that name them (never the default).
    pub draining: BTreeMap<Version, Arc<LoadedVersion>>,
    /// The desired versions (pinned, else aspired).
    pub desired: Vec<Version>,
    /// Every version's status on this worker.
    pub statuses: BTreeMap<Version, VersionStatus>,
    /// The versions in storage, with their signatures (for metadata).
    pub available: Option<AvailableVersions>,
}

impl ModelEntry {
    /// The version a request without one goes to: the highest desired version that is
    /// AVAILABLE, else the highest AVAILABLE one (so serving continues while a new or
    /// rolled-back version loads).
    pub fn default_version(&self) -> Option<Version> {
        self.desired
            .iter()
            .rev()
            .find(|v| self.loaded.contains_key(v))
            .copied()
            .or_else(|| self.loaded.keys().next_back().copied())
    }

    /// The loaded version a request goes to.
    pub fn pick(
        &self,
        model: &ModelName,
        requested: Option<Version>,
    ) -> Result<Arc<LoadedVersion>, WorkerError> {
        self.pick_for(model, requested, false)
    }

    /// [`Self::pick`] for a request a router `forwarded` (it carried
    /// [`crate::error::FORWARDED_HEADER`]). A router forwards a version only to a worker
    /// whose record it last saw with that version AVAILABLE, so a forwarded request for a
    /// version not served here (unloading past its grace, unloaded, or unloaded and now
    /// loading again) means the router's view lags: the answer is then
    /// [`WorkerError::VersionUnloading`], and the router picks again. A client calling
    /// the worker directly still gets NOT_FOUND, as from TensorFlow Serving.
    pub fn pick_for(
        &self,
        model: &ModelName,
        requested: Option<Version>,
        forwarded: bool,
    ) -> Result<Arc<LoadedVersion>, WorkerError> {
        if let Some(v) = requested.filter(|_| forwarded)
            && !self.loaded.contains_key(&v)
            && !self.draining.contains_key(&v)
        {
            return Err(WorkerError::VersionUnloading {
                model: model.clone(),
                version: v,
                default_version: self.default_version(),
            });
        }
        let not_found = |what: String| WorkerError::VersionNotFound {
            model: model.clone(),
            what,
            available: self.loaded.keys().copied().collect(),
        };
        match requested {
            Some(v) => self
                .loaded
                .get(&v)
                .or_else(|| self.draining.get(&v))
                .cloned()
                .ok_or_else(|| {
                    not_found(match self.statuses.get(&v) {
                        Some(s) => format!("version {v} is {}", s.state),
                        None => format!("version {v} is not loaded"),
                    })
                }),
            None => self
                .default_version()
                .and_then(|v| self.loaded.get(&v).cloned())
                .ok_or_else(|| not_found("no version is loaded yet".to_string())),
        }
    }
}

#[cfg(test)]
#[path = "version_manager_pick_tests.rs"]
mod pick_tests;

/// The immutable snapshot request handlers read.
#[derive(Default, Clone)]
pub struct ServingTable {
    /// Models by name.
    pub models: HashMap<ModelName, ModelEntry>,
}

impl ServingTable {
    /// The entry of `model` by name; NOT_FOUND naming the models served when unknown.
    pub fn model(&self, name: &str) -> Result<(&ModelName, &ModelEntry), WorkerError> {
        ModelName::new(name)
            .ok()
            .and_then(|n| self.models.get_key_value(&n))
            .ok_or_else(|| {
                let mut served: Vec<String> = self.models.keys().map(ToString::to_string).collect();
                served.sort_unstable();
                WorkerError::ModelNotFound {
                    model: name.to_string(),
                    served,
                }
            })
    }
}

/// Handle to the running version manager.
pub struct VersionManager {
    table: ArcSwap<ServingTable>,
    ready: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    /// Writes this worker's record; [`VersionManager::deregister`] removes it through
    /// the same writer, after which no record is written again.
    writer: RecordWriter,
    metrics: WorkerMetrics,
}

impl VersionManager {
    /// Starts the manager's actor on the current tokio runtime. It runs until
    /// [`Self::shutdown`]; the returned handle ends when it has unloaded everything and
    /// deregistered.
    pub fn start(
        config: ManagerConfig,
        device_name: String,
        registry: Arc<dyn Registry>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (ready, _) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);
        let manager = Arc::new(Self {
            table: ArcSwap::from_pointee(ServingTable::default()),
            ready,
            stop,
            writer: RecordWriter::start(registry.clone(), config.worker_id.clone()),
            metrics: config.metrics.clone(),
        });
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let actor = Actor {
            cluster_rx: registry.subscribe(),
            config: Arc::new(config),
            device_name,
            manager: manager.clone(),
            slots: BTreeMap::new(),
            cluster: Arc::new(ClusterState::default()),
            events_tx,
            watches: BTreeMap::new(),
        };
        let handle = tokio::spawn(actor.run(events_rx, stop_rx));
        (manager, handle)
    }

    /// This worker's metrics.
    pub fn metrics(&self) -> &WorkerMetrics {
        &self.metrics
    }

    /// The current snapshot.
    pub fn table(&self) -> arc_swap::Guard<Arc<ServingTable>> {
        self.table.load()
    }

    /// True once every model with desired versions has one AVAILABLE.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Removes this worker's record from the registry (so routers stop sending to it)
    /// and keeps it out, while requests keep being served; returns once it is removed
    /// (or after 5 s if the registry is unreachable).
    pub async fn deregister(&self) {
        self.writer.remove();
        // Bounded: an unreachable registry must not hold up the drain; the record then
        // expires with its lease.
        self.writer.removed_within(DEREGISTER_WAIT).await;
    }

    /// Asks the actor to deregister, drain and unload everything.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}

/// How long a deregistration waits for the registry.
const DEREGISTER_WAIT: Duration = Duration::from_secs(5);

type Key = (ModelName, Version);

enum Slot {
    Loading {
        attempts: u32,
    },
    Ready(Arc<LoadedVersion>),
    /// Still answering requests that name it (routers may not have seen the new state
    /// yet) while `Some`; then waiting for its requests in flight.
    Unloading(Option<Arc<LoadedVersion>>),
    Failed {
        error: String,
        attempts: u32,
        retry_at: Instant,
    },
    /// Its location is not under the storage roots: not retried until the registry
    /// gives the version another location.
    Refused {
        location: String,
        error: String,
    },
    Ended,
}

enum Event {
    Loaded(Key, Result<Arc<LoadedVersion>, String>),
    /// The location (as in the registry) was refused before anything was fetched.
    Refused(Key, String, String),
    /// The unload grace is over: stop answering requests for this version.
    StopServing(Key),
    Unloaded(Key),
    /// Its requests did not finish within the drain limit; they were answered with a
    /// retryable error and the version dropped.
    Dropped(Key),
}

struct Actor {
    cluster_rx: watch::Receiver<Arc<ClusterState>>,
    config: Arc<ManagerConfig>,
    device_name: String,
    manager: Arc<VersionManager>,
    slots: BTreeMap<Key, Slot>,
    cluster: Arc<ClusterState>,
    events_tx: mpsc::UnboundedSender<Event>,
    /// The forward passes of each loaded version, kept until the version is gone and
    /// its last pass returned (a dropped version's stuck pass still shows), with the
    /// slow passes already counted in the metrics.
    watches: BTreeMap<Key, (Arc<PassWatch>, u64)>,
}

impl Actor {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut stop: watch::Receiver<bool>,
    ) {
        self.cluster = self.cluster_rx.borrow_and_update().clone();
        loop {
            self.reconcile();
            self.publish_table();
            self.publish_record();
            // Wake for the earliest retry, and at least every second to look for slow
            // forward passes.
            let tick = Instant::now() + Duration::from_secs(1);
            let wake = self.next_retry().map_or(tick, |retry| retry.min(tick));
            tokio::select! {
                changed = self.cluster_rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.cluster = self.cluster_rx.borrow_and_update().clone();
                }
                Some(ev) = events.recv() => self.on_event(ev),
                _ = tokio::time::sleep_until(wake) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        self.drain(events).await;
    }

    /// The next retry still to come. Failed versions that are no longer desired have
    /// retry times in the past and are never retried (reconcile only loads desired ones).
    fn next_retry(&self) -> Option<Instant> {
        let now = Instant::now();
        self.slots
            .values()
            .filter_map(|s| match s {
                Slot::Failed { retry_at, .. } if *retry_at > now => Some(*retry_at),
                _ => None,
            })
            .min()
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Loaded(key, Ok(lv)) => {
                tracing::info!(model = %key.0, version = %key.1, "version AVAILABLE");
                self.watches.insert(key.clone(), (lv.batcher.passes(), 0));
                self.slots.insert(key, Slot::Ready(lv));
            }
            Event::Loaded(key, Err(error)) => {
                let attempts = match self.slots.get(&key) {
                    Some(Slot::Loading { attempts }) => attempts + 1,
                    _ => 1,
                };
                let backoff = self
                    .config
                    .load_retry_initial
                    .saturating_mul(1 << (attempts - 1).min(16))
                    .min(self.config.load_retry_max);
                tracing::error!(model = %key.0, version = %key.1, attempts, retry_in = ?backoff, "load failed: {error}");
                self.slots.insert(
                    key,
                    Slot::Failed {
                        error,
                        attempts,
                        retry_at: Instant::now() + backoff,
                    },
                );
            }
            Event::Refused(key, location, error) => {
                tracing::error!(model = %key.0, version = %key.1, "{error}");
                self.slots.insert(key, Slot::Refused { location, error });
            }
            Event::StopServing(key) => {
                if let Some(Slot::Unloading(serving)) = self.slots.get_mut(&key) {
                    *serving = None;
                }
            }
            Event::Unloaded(key) => {
                tracing::info!(model = %key.0, version = %key.1, "version unloaded");
                self.slots.insert(key, Slot::Ended);
            }
            Event::Dropped(key) => {
                tracing::warn!(
                    model = %key.0, version = %key.1, limit = ?self.config.unload_drain,
                    "version dropped: its requests in flight did not finish within the drain limit (--unload-drain-seconds); they were answered with a retryable error"
                );
                self.slots.insert(key, Slot::Ended);
            }
        }
    }

    /// Starts the loads and unloads that bring the slots towards the desired versions.
    fn reconcile(&mut self) {
        let now = Instant::now();
        let mut models: BTreeSet<ModelName> = self.cluster.models.keys().cloned().collect();
        models.extend(self.slots.keys().map(|(m, _)| m.clone()));
        let cluster = self.cluster.clone();
        for model in models {
            let desired = cluster.desired(&model).versions;
            let available = cluster
                .models
                .get(&model)
                .and_then(|m| m.available.as_ref());
            for v in &desired {
                let key = (model.clone(), *v);
                let Some(entry) = available.and_then(|a| a.get(*v)) else {
                    continue;
                };
                let attempts = match self.slots.get(&key) {
                    None | Some(Slot::Ended) => 0,
                    Some(Slot::Failed {
                        attempts, retry_at, ..
                    }) if *retry_at <= now => *attempts,
                    Some(Slot::Refused { location, .. }) if *location != entry.path => 0,
                    Some(_) => continue,
                };
                self.start_load(key, entry.path.clone(), entry.signatures.clone(), attempts);
            }
            let desired_ready = desired
                .iter()
                .any(|v| matches!(self.slots.get(&(model.clone(), *v)), Some(Slot::Ready(_))));
            if !desired_ready && !desired.is_empty() {
                continue;
            }
            let to_unload: Vec<Key> = self
                .slots
                .iter()
                .filter(|((m, v), s)| {
                    m == &model && !desired.contains(v) && matches!(s, Slot::Ready(_))
                })
                .map(|(k, _)| k.clone())
                .collect();
            for key in to_unload {
                self.start_unload(key, self.config.unload_grace);
            }
        }
        // A model discovery stopped listing is forgotten once its versions are unloaded,
        // so it leaves the serving table (requests get NOT_FOUND, not "no version loaded")
        // and this worker's record, instead of lingering as END statuses forever.
        self.slots.retain(|(m, _), s| {
            is_listed(&cluster, m)
                || !matches!(s, Slot::Ended | Slot::Failed { .. } | Slot::Refused { .. })
        });
    }

    fn start_load(&mut self, key: Key, path: String, signatures: SignatureMap, attempts: u32) {
        tracing::info!(model = %key.0, version = %key.1, %path, "loading version");
        self.slots.insert(key.clone(), Slot::Loading { attempts });
        let config = self.config.clone();
        let tx = self.events_tx.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = load_version(&config, &key, &path, signatures).await;
            match &result {
                Ok(_) => config
                    .metrics
                    .version_loaded(key.0.as_str(), started.elapsed()),
                Err(_) => config.metrics.version_load_failed(key.0.as_str()),
            }
            let event = match result {
                Ok(lv) => Event::Loaded(key, Ok(lv)),
                Err(LoadFailure::Failed(error)) => Event::Loaded(key, Err(error)),
                Err(LoadFailure::Refused(why)) => {
                    let error = format!(
                        "location {path} of {} version {} {why}; not loaded",
                        key.0, key.1
                    );
                    Event::Refused(key, path, error)
                }
            };
            let _ = tx.send(event);
        });
    }

    /// Unloads a Ready version. During `grace` it reports UNLOADING (so routers stop
    /// choosing it) but still answers requests that name it, since a router may have
    /// chosen it just before it saw the new state.
    fn start_unload(&mut self, key: Key, grace: Duration) {
        let lv = match self.slots.get(&key) {
            Some(Slot::Ready(lv)) => lv.clone(),
            _ => return,
        };
        let serving = (!grace.is_zero()).then(|| lv.clone());
        self.slots.insert(key.clone(), Slot::Unloading(serving));
        tracing::info!(model = %key.0, version = %key.1, ?grace, "unloading version");
        let tx = self.events_tx.clone();
        let cache = version_cache_dir(&self.config, &key);
        let drain = self.config.unload_drain;
        tokio::spawn(async move {
            if !grace.is_zero() {
                tokio::time::sleep(grace).await;
                let _ = tx.send(Event::StopServing(key.clone()));
            }
            let drained = unload_version(lv, drain).await;
            let _ = tokio::fs::remove_dir_all(cache).await;
            let _ = tx.send(if drained {
                Event::Unloaded(key)
            } else {
                Event::Dropped(key)
            });
        });
    }

    fn statuses(&self) -> BTreeMap<ModelName, BTreeMap<Version, VersionStatus>> {
        let mut out: BTreeMap<ModelName, BTreeMap<Version, VersionStatus>> = BTreeMap::new();
        for ((m, v), slot) in &self.slots {
            let (state, error) = match slot {
                Slot::Loading { .. } => (VersionState::Loading, None),
                Slot::Ready(_) => (VersionState::Available, None),
                Slot::Unloading(_) => (VersionState::Unloading, None),
                Slot::Failed { error, .. } | Slot::Refused { error, .. } => {
                    (VersionState::End, Some(error.clone()))
                }
                Slot::Ended => (VersionState::End, None),
            };
            out.entry(m.clone())
                .or_default()
                .insert(*v, VersionStatus { state, error });
        }
        out
    }

    fn publish_table(&self) {
        let mut statuses = self.statuses();
        let mut table = ServingTable::default();
        // Not ready before the registry names a model: a server with nothing loaded yet
        // must not pass a readiness probe.
        let mut ready = !self.cluster.models.is_empty();
        // A pin left behind by `remove_model` does not keep a model in the table.
        let mut names: BTreeSet<ModelName> = self
            .cluster
            .models
            .keys()
            .filter(|m| is_listed(&self.cluster, m))
            .cloned()
            .collect();
        names.extend(statuses.keys().cloned());
        for model in names {
            let desired = self.cluster.desired(&model).versions;
            let loaded: BTreeMap<Version, Arc<LoadedVersion>> = self
                .slots
                .iter()
                .filter_map(|((m, v), s)| match s {
                    Slot::Ready(lv) if m == &model => Some((*v, lv.clone())),
                    _ => None,
                })
                .collect();
            let draining = self
                .slots
                .iter()
                .filter_map(|((m, v), s)| match s {
                    Slot::Unloading(Some(lv)) if m == &model => Some((*v, lv.clone())),
                    _ => None,
                })
                .collect();
            if !desired.is_empty() && loaded.is_empty() {
                ready = false;
            }
            let entry = ModelEntry {
                loaded,
                draining,
                desired,
                statuses: statuses.remove(&model).unwrap_or_default(),
                available: self
                    .cluster
                    .models
                    .get(&model)
                    .and_then(|m| m.available.clone()),
            };
            table.models.insert(model, entry);
        }
        self.config.metrics.set_versions_available(
            table
                .models
                .iter()
                .map(|(model, entry)| (model.as_str(), entry.loaded.len())),
        );
        self.manager.table.store(Arc::new(table));
        self.manager
            .ready
            .send_if_modified(|r| std::mem::replace(r, ready) != ready);
    }

    /// Hands the record as it is now to the writer; never waits for the registry.
    fn publish_record(&mut self) {
        let slow_passes = self.check_slow_passes();
        self.manager.writer.put(WorkerRecord {
            address: self.config.advertise_address.clone(),
            device: self.device_name.clone(),
            models: self.statuses(),
            slow_passes,
        });
    }

    /// Updates the slow-pass metrics, forgets the versions that are gone with no pass
    /// left running, and lists the versions that had slow passes.
    fn check_slow_passes(&mut self) -> Vec<SlowPasses> {
        let now = std::time::Instant::now();
        let slots = &self.slots;
        self.watches.retain(|key, (watch, _)| {
            matches!(
                slots.get(key),
                Some(Slot::Ready(_) | Slot::Unloading(_) | Slot::Loading { .. })
            ) || watch.running() > 0
        });
        let mut out = Vec::new();
        for ((model, version), (watch, counted)) in &mut self.watches {
            let slow = watch.check(now);
            self.config.metrics.slow_passes(
                model.as_str(),
                &version.to_string(),
                slow.total.saturating_sub(*counted),
                slow.running,
            );
            *counted = slow.total;
            if slow.total > 0 {
                out.push(SlowPasses {
                    model: model.clone(),
                    version: *version,
                    running: slow.running,
                    total: slow.total,
                });
            }
        }
        out
    }

    /// Deregisters first (so routers stop sending), then lets in-flight requests finish
    /// and unloads everything.
    async fn drain(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        self.manager.writer.remove();
        if !self.manager.writer.removed_within(DEREGISTER_WAIT).await {
            tracing::warn!(
                "could not deregister within {DEREGISTER_WAIT:?}; the record expires with its lease"
            );
        }
        let keys: Vec<Key> = self.slots.keys().cloned().collect();
        for key in keys {
            self.start_unload(key, Duration::ZERO);
        }
        self.publish_table();
        while self
            .slots
            .values()
            .any(|s| matches!(s, Slot::Unloading(_) | Slot::Loading { .. }))
        {
            match events.recv().await {
                Some(Event::Loaded(key, Ok(lv))) => {
                    self.slots.insert(key.clone(), Slot::Ready(lv));
                    self.start_unload(key, Duration::ZERO);
                }
                Some(ev) => self.on_event(ev),
                None => break,
            }
        }
        self.publish_table();
    }
}

/// Whether discovery lists `model` (its `available` or `aspired` key exists).
fn is_listed(cluster: &ClusterState, model: &ModelName) -> bool {
    cluster
        .models
        .get(model)
        .is_some_and(|m| m.available.is_some() || m.aspired.is_some())
}

fn version_cache_dir(config: &ManagerConfig, key: &Key) -> PathBuf {
    config
        .cache_dir
        .join(key.0.as_str())
        .join(key.1.to_string())
}

/// Why a load did not happen.
enum LoadFailure {
    /// The location is not under the storage roots; the phrase follows the location.
    Refused(String),
    /// Anything else: retried with backoff.
    Failed(String),
}

impl From<String> for LoadFailure {
    fn from(error: String) -> Self {
        LoadFailure::Failed(error)
    }
}

/// Checks `path` against the storage roots, and only then fetches it into the cache,
/// loads it and warms it up.
async fn load_version(
    config: &Arc<ManagerConfig>,
    key: &Key,
    path: &str,
    signatures: SignatureMap,
) -> Result<Arc<LoadedVersion>, LoadFailure> {
    // The location comes from the registry, the roots from this worker's flags.
    // Resolving symlinks touches the filesystem, so off the async threads.
    let roots = config.storage_roots.clone();
    let location = path.to_string();
    let checked: CheckedLocation = tokio::task::spawn_blocking(move || roots.check(&location))
        .await
        .map_err(|_| "the storage roots check panicked".to_string())?
        .map_err(|e| match e {
            LocationError::Refused(why) => LoadFailure::Refused(why),
            LocationError::Unresolvable(why) => {
                LoadFailure::Failed(format!("location {path} {why}"))
            }
        })?;
    let dir = version_cache_dir(config, key);
    let _ = tokio::fs::remove_dir_all(&dir).await;
    aspire_discovery::storage::fetch_version(&checked.fetch_from, &dir, &checked.local_roots)
        .await
        .map_err(|e| match e {
            DiscoveryError::OutsideRoots { .. } => {
                LoadFailure::Refused(format!("holds a file out of the storage roots ({e})"))
            }
            e => LoadFailure::Failed(format!("fetching {path}: {e}")),
        })?;
    let config = config.clone();
    let key = key.clone();
    let (done, loaded) = tokio::sync::oneshot::channel();
    // A thread of its own that ends with the load, not a pooled blocking thread: the
    // warm-up gives the thread an OpenMP team, and while that thread lives, libgomp counts
    // more threads than CPUs and stops spinning, which slowed ResNet-18's forward pass
    // from 24 to 34 ms for the 10 s tokio keeps an idle blocking thread.
    std::thread::Builder::new()
        .name("aspire-load".to_string())
        .spawn(move || {
            let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let model =
                    TorchModel::load(&dir, config.device, &signatures, &config.warmup_batch_sizes)?;
                let metrics = config.metrics.version(key.0.as_str(), &key.1.to_string());
                let lv = Arc::new(LoadedVersion::with_metrics(
                    key.0,
                    key.1,
                    signatures,
                    model,
                    config.batching.clone(),
                    metrics,
                    config.batch_pool.as_deref(),
                ));
                lv.batcher.passes().set_threshold(config.slow_pass);
                Ok(lv)
            }))
            .unwrap_or_else(|_| Err("the load panicked".to_string()));
            let _ = done.send(loaded);
        })
        .map_err(|e| format!("cannot start a thread to load the version: {e}"))?;
    Ok(loaded
        .await
        .map_err(|_| "the load thread ended without an answer".to_string())??)
}

/// Waits for requests in flight on `lv` to finish (they hold clones of the `Arc`) and
/// for its forward passes to return (a caller that left does not end its pass), at most
/// `drain`, then stops its batcher. Returns false when the drain limit was reached: the
/// requests still queued or running were then answered with a retryable error, and the
/// batcher lets go of the model once its last forward pass returns, without anyone
/// waiting for it.
async fn unload_version(lv: Arc<LoadedVersion>, drain: Duration) -> bool {
    let in_flight_done = async {
        while Arc::strong_count(&lv) > 1 || lv.batcher.running_passes() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    if tokio::time::timeout(drain, in_flight_done).await.is_err() {
        lv.batcher.abort();
        return false;
    }
    let _ = tokio::task::spawn_blocking(move || lv.batcher.shutdown()).await;
    true
}
