//! The routing table: per model, its desired versions and, per version, the registered
//! workers that have it AVAILABLE. A task rebuilds it from every new [`ClusterState`] and
//! swaps it in whole, so a request reads it without a lock; which version a request
//! gets is decided here.
//!
//! A worker whose record vanishes stays in the table, with its last record, while it
//! answers health checks (see [`crate::workers`]): a lease lost to an etcd stall is not a
//! dead worker. The table is rebuilt without it once a probe finds it gone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use aspire_core::records::VersionState;
use aspire_core::{ClusterState, ModelName, Version, WorkerRecord};
use aspire_proto::serving::{ModelSpec, model_spec::VersionChoice};
use tokio::sync::{mpsc, watch};
use tonic::transport::ClientTlsConfig;

use crate::error::RouterError;
use crate::workers::{self, Endpoint, WorkerHandle};

/// Everything the router knows, at one registry revision.
#[derive(Debug, Default)]
pub(crate) struct RoutingTable {
    /// The registry's state this table was built from (signatures, worker states).
    pub(crate) state: Arc<ClusterState>,
    models: BTreeMap<String, ModelRoutes>,
    /// Every registration, by worker id.
    pub(crate) workers: Vec<Arc<WorkerHandle>>,
}

/// Where one model's versions are served.
#[derive(Debug)]
pub(crate) struct ModelRoutes {
    pub(crate) name: ModelName,
    /// Pinned when the pin is valid, else aspired; ascending.
    desired: Vec<Version>,
    /// The workers that have each version AVAILABLE.
    serving: BTreeMap<Version, Vec<Arc<WorkerHandle>>>,
}

impl ModelRoutes {
    fn has_live(&self, version: Version) -> bool {
        self.serving
            .get(&version)
            .is_some_and(|ws| ws.iter().any(|w| w.is_live()))
    }

    /// The version a request without one gets: the highest desired version that a live
    /// worker has AVAILABLE; else (a new or rolled-back version still loading) the
    /// highest AVAILABLE on any live worker, so serving goes on meanwhile.
    pub(crate) fn default_version(&self) -> Option<Version> {
        let desired = self.desired.iter().rev().find(|v| self.has_live(**v));
        let any = || self.serving.keys().rev().find(|v| self.has_live(**v));
        desired.or_else(any).copied()
    }

    /// The versions AVAILABLE on a live worker, ascending.
    pub(crate) fn live_versions(&self) -> Vec<Version> {
        let live = |v: &&Version| self.has_live(**v);
        self.serving.keys().filter(live).copied().collect()
    }

    /// The desired versions, ascending.
    pub(crate) fn desired(&self) -> &[Version] {
        &self.desired
    }

    fn workers(&self, version: Version) -> &[Arc<WorkerHandle>] {
        self.serving.get(&version).map_or(&[], Vec::as_slice)
    }
}

impl RoutingTable {
    /// The routes of `model`, or NOT_FOUND listing the known models.
    pub(crate) fn model(&self, model: &str) -> Result<&ModelRoutes, RouterError> {
        self.models
            .get(model)
            .ok_or_else(|| RouterError::ModelNotFound {
                model: model.to_string(),
                served: self.models.keys().cloned().collect(),
            })
    }

    /// The version a request for `model` goes to (`wanted`, or the default rule) and
    /// the live worker that should answer it.
    pub(crate) fn route(
        &self,
        model: &str,
        wanted: Option<Version>,
    ) -> Result<(Version, Arc<WorkerHandle>), RouterError> {
        let routes = self.model(model)?;
        let version = match wanted {
            Some(v) if routes.serving.contains_key(&v) => v,
            Some(v) => {
                return Err(RouterError::VersionNotFound {
                    model: routes.name.clone(),
                    what: format!("version {v} is not AVAILABLE on any worker"),
                    available: routes.live_versions(),
                });
            }
            None => routes
                .default_version()
                .ok_or_else(|| self.no_live_worker(routes, None))?,
        };
        workers::pick(routes.workers(version), None)
            .map(|w| (version, Arc::clone(w)))
            .ok_or_else(|| self.no_live_worker(routes, Some(version)))
    }

    /// Another live worker with exactly `version`, not at `failed`'s address, for a
    /// retry: the same version, so the answer does not change.
    pub(crate) fn route_exact(
        &self,
        model: &str,
        version: Version,
        failed: &WorkerHandle,
    ) -> Option<Arc<WorkerHandle>> {
        let routes = self.models.get(model)?;
        workers::pick(routes.workers(version), Some(&failed.endpoint)).cloned()
    }

    /// Where a request that named no version goes when `avoid` answered that it is
    /// unloading the version it was sent and named no default: the default version on
    /// another live worker, else the highest version another live worker has.
    pub(crate) fn route_elsewhere(
        &self,
        model: &str,
        avoid: &WorkerHandle,
    ) -> Result<(Version, Arc<WorkerHandle>), RouterError> {
        let routes = self.model(model)?;
        let default = routes.default_version();
        let others = routes.serving.keys().rev().filter(|v| Some(**v) != default);
        default
            .into_iter()
            .chain(others.copied())
            .find_map(|v| {
                workers::pick(routes.workers(v), Some(&avoid.endpoint)).map(|w| (v, Arc::clone(w)))
            })
            .ok_or_else(|| self.no_live_worker(routes, None))
    }

    fn no_live_worker(&self, routes: &ModelRoutes, version: Option<Version>) -> RouterError {
        let down: Vec<&str> = match version {
            Some(v) => routes.workers(v).iter().map(|w| w.id.as_str()).collect(),
            None => routes
                .serving
                .values()
                .flatten()
                .map(|w| w.id.as_str())
                .collect(),
        };
        let what = match version {
            Some(v) => format!("version {v} of model '{}'", routes.name),
            None => format!("model '{}'", routes.name),
        };
        RouterError::NoLiveWorker(if down.is_empty() {
            format!("no worker has {what} AVAILABLE yet; retry when one has loaded it")
        } else {
            format!(
                "every worker that has {what} AVAILABLE failed just now ({}); retry shortly",
                down.join(", ")
            )
        })
    }
}

/// The version a `ModelSpec` asks for: `None` for the default one.
pub(crate) fn requested_version(spec: &ModelSpec) -> Result<Option<Version>, RouterError> {
    match &spec.version_choice {
        None => Ok(None),
        Some(VersionChoice::Version(v)) => Version::from_i64(*v).map(Some).ok_or_else(|| {
            RouterError::InvalidArgument(format!(
                "model_spec.version is {v}; versions are positive integers"
            ))
        }),
        Some(VersionChoice::VersionLabel(label)) => Err(RouterError::InvalidArgument(format!(
            "model_spec.version_label '{label}' is not supported yet; ask for a version number"
        ))),
    }
}

/// Builds tables, carrying over what must outlive one registry revision: a worker whose
/// record did not change keeps its handle (and so its down mark), a worker whose record
/// vanished keeps it while its health probes answer SERVING, and an address keeps its
/// channel and in-flight counter.
#[derive(Debug)]
pub(crate) struct TableBuilder {
    /// Workers registered now.
    handles: HashMap<String, Arc<WorkerHandle>>,
    /// Workers whose record vanished, kept (with their last record) while they answer.
    vanished: HashMap<String, Arc<WorkerHandle>>,
    /// Where their probes send the ones found gone.
    dropped: mpsc::UnboundedSender<Arc<WorkerHandle>>,
    /// How often a vanished worker is probed.
    vanished_probe_interval: Duration,
    endpoints: HashMap<String, Arc<Endpoint>>,
    /// Records whose address is unusable, so each is logged once.
    refused: HashMap<String, WorkerRecord>,
    /// TLS for worker channels (`--worker-tls-*`); `None` for plaintext.
    tls: Option<ClientTlsConfig>,
}

impl TableBuilder {
    /// A builder whose vanished workers' probes report the ones found gone on the
    /// returned receiver (hand each to [`Self::forget`], then build again).
    pub(crate) fn new(
        tls: Option<ClientTlsConfig>,
        vanished_probe_interval: Duration,
    ) -> (Self, mpsc::UnboundedReceiver<Arc<WorkerHandle>>) {
        let (dropped, dropped_rx) = mpsc::unbounded_channel();
        let builder = Self {
            handles: HashMap::new(),
            vanished: HashMap::new(),
            dropped,
            vanished_probe_interval,
            endpoints: HashMap::new(),
            refused: HashMap::new(),
            tls,
        };
        (builder, dropped_rx)
    }

    /// Lets go of `handle`, a vanished worker a probe found gone (unless it has
    /// re-registered since: then it is no longer kept as vanished).
    pub(crate) fn forget(&mut self, handle: &Arc<WorkerHandle>) {
        if self
            .vanished
            .get(&handle.id)
            .is_some_and(|h| Arc::ptr_eq(h, handle))
        {
            self.vanished.remove(&handle.id);
            handle.retire();
        }
    }

    /// The table for `state`. Call it inside a Tokio runtime (channels start a task).
    pub(crate) fn build(&mut self, state: Arc<ClusterState>) -> RoutingTable {
        let mut handles = HashMap::with_capacity(state.workers.len());
        for (id, record) in &state.workers {
            // Registered again after its record vanished: a fresh handle, live.
            if let Some(old) = self.vanished.remove(id) {
                old.retire();
                tracing::info!(worker = %id, "worker registered again");
            }
            let same = self.handles.get(id).filter(|h| h.record == *record);
            let handle = match same {
                Some(h) => Arc::clone(h),
                None => match self.endpoint(&record.address) {
                    Ok(ep) => Arc::new(WorkerHandle::new(id.clone(), record.clone(), ep)),
                    Err(why) => {
                        if self.refused.get(id) != Some(record) {
                            tracing::warn!(worker = %id, "ignoring worker: {why}");
                            self.refused.insert(id.clone(), record.clone());
                        }
                        continue;
                    }
                },
            };
            handles.insert(id.clone(), handle);
        }
        self.refused.retain(|id, _| state.workers.contains_key(id));
        let previous = std::mem::replace(&mut self.handles, handles);
        for (id, handle) in previous {
            if !self.handles.contains_key(&id) {
                handle.watch_vanished(self.vanished_probe_interval, self.dropped.clone());
                self.vanished.insert(id, handle);
            }
        }
        let kept = || self.handles.values().chain(self.vanished.values());
        let in_use: std::collections::HashSet<&str> =
            kept().map(|h| h.endpoint.address.as_str()).collect();
        self.endpoints
            .retain(|addr, _| in_use.contains(addr.as_str()));

        let mut workers: Vec<Arc<WorkerHandle>> = kept().cloned().collect();
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        let new_routes = |name: &ModelName| ModelRoutes {
            name: name.clone(),
            desired: state.desired(name).versions,
            serving: BTreeMap::new(),
        };
        let mut models: BTreeMap<String, ModelRoutes> = state
            .models
            .keys()
            .map(|name| (name.to_string(), new_routes(name)))
            .collect();
        for worker in &workers {
            for (name, versions) in &worker.record.models {
                let routes = models
                    .entry(name.to_string())
                    .or_insert_with(|| new_routes(name));
                for (version, status) in versions {
                    if status.state == VersionState::Available {
                        let list = routes.serving.entry(*version).or_default();
                        list.push(Arc::clone(worker));
                    }
                }
            }
        }
        RoutingTable {
            state,
            models,
            workers,
        }
    }

    fn endpoint(&mut self, address: &str) -> Result<Arc<Endpoint>, String> {
        if let Some(ep) = self.endpoints.get(address) {
            return Ok(Arc::clone(ep));
        }
        let ep = Arc::new(Endpoint::connect_lazy(address, self.tls.as_ref())?);
        self.endpoints.insert(address.to_string(), Arc::clone(&ep));
        Ok(ep)
    }
}

/// Rebuilds the table on every registry change and whenever a vanished worker is found
/// gone. `ready` turns true once the first table is in place. A worker whose record vanished stays
/// routable while its health probes (every `vanished_probe_interval`) answer SERVING.
pub(crate) async fn follow_registry(
    mut states: watch::Receiver<Arc<ClusterState>>,
    table: Arc<ArcSwap<RoutingTable>>,
    ready: watch::Sender<bool>,
    tls: Option<ClientTlsConfig>,
    vanished_probe_interval: Duration,
) {
    let (mut builder, mut dropped) = TableBuilder::new(tls, vanished_probe_interval);
    let mut registry_open = true;
    loop {
        let state = Arc::clone(&states.borrow_and_update());
        table.store(Arc::new(builder.build(state)));
        ready.send_replace(true);
        tokio::select! {
            changed = states.changed(), if registry_open => {
                if changed.is_err() {
                    tracing::warn!("the registry closed its watch; routing on the last table");
                    registry_open = false;
                }
            }
            // The builder holds a sender, so this never ends.
            Some(gone) = dropped.recv() => builder.forget(&gone),
        }
    }
}

#[cfg(test)]
#[path = "routing_table_tests.rs"]
mod tests;
