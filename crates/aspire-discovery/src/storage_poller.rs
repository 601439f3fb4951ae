//! The poll loop: [`StoragePoller`] polls every configured model's base path and publishes
//! to the registry its complete versions (`available`) and those its version policy
//! selects (`aspired`), as TensorFlow Serving's file-system storage path source does.
//!
//! A model's first complete result is always written (the registry may still hold what
//! an earlier run published); after that a key is written only when its value changes.
//!
//! Differences from TF Serving, on purpose:
//! - a version directory counts only once it has `model.pt` and lists the same on two
//!   polls in a row, so a `cp -r` in progress is never loaded half-written;
//! - a base path that cannot be read, or holds no complete version, keeps the values last
//!   published (TF Serving unloaded everything on an empty listing) and says so once;
//! - models can be replaced while running ([`ModelsHandle::set_models`]); a model that
//!   leaves the config has its registry keys removed.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aspire_core::ModelName;
use aspire_registry::Registry;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::model_config::ModelConfig;
use crate::model_watch::ModelWatch;

/// With `--file_system_poll_wait_seconds=0`, how soon the startup polls repeat while
/// version directories settle (a version counts once two listings agree).
pub const SETTLE_POLL: Duration = Duration::from_secs(1);

/// Polls the base path of each configured model and publishes what it finds.
pub struct StoragePoller {
    models: BTreeMap<ModelName, ModelWatch>,
    /// Models that left the config and whose keys are still to be removed (retried on
    /// every poll until the registry accepts it).
    to_remove: BTreeSet<ModelName>,
    updates: watch::Receiver<Vec<ModelConfig>>,
    handle: ModelsHandle,
}

/// Replaces the models of a running [`StoragePoller`] (for
/// `--model_config_file_poll_wait_seconds`). Cheap to clone.
#[derive(Clone)]
pub struct ModelsHandle {
    tx: watch::Sender<Vec<ModelConfig>>,
}

impl ModelsHandle {
    /// Hands `models` to the poller, which applies them and polls at once. Replaces any
    /// list handed over before that was not applied yet.
    pub fn set_models(&self, models: Vec<ModelConfig>) {
        self.tx.send_replace(models);
    }
}

impl StoragePoller {
    /// A poller of `models`. Nothing is read until the first poll. If two configs share
    /// a name, the later one wins (config files are checked for that when parsed).
    pub fn new(models: Vec<ModelConfig>) -> Self {
        let (tx, mut updates) = watch::channel(Vec::new());
        updates.mark_unchanged();
        let mut poller = Self {
            models: BTreeMap::new(),
            to_remove: BTreeSet::new(),
            updates,
            handle: ModelsHandle { tx },
        };
        poller.set_models(models);
        poller
    }

    /// A handle that replaces the models while [`Self::run`] runs.
    pub fn handle(&self) -> ModelsHandle {
        self.handle.clone()
    }

    /// Replaces the watched models. Models no longer listed have their registry keys
    /// removed on the next poll; new ones are polled from then on and published at their
    /// first complete version; kept ones keep their state (a changed base path starts
    /// its versions afresh, a changed policy applies on the next poll).
    pub fn set_models(&mut self, models: Vec<ModelConfig>) {
        let mut wanted: BTreeMap<ModelName, ModelConfig> =
            models.into_iter().map(|m| (m.name.clone(), m)).collect();
        let gone: Vec<ModelName> = self
            .models
            .keys()
            .filter(|name| !wanted.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            info!(model = %name, "model {name} left the config; removing its versions from the registry");
            self.models.remove(&name);
            self.to_remove.insert(name);
        }
        for (name, config) in std::mem::take(&mut wanted) {
            self.to_remove.remove(&name);
            match self.models.get_mut(&name) {
                Some(watch) if watch.config == config => {}
                Some(watch) => watch.reconfigure(config),
                None => {
                    info!(model = %name, "watching model {name} at {}", config.base_path);
                    self.models.insert(name, ModelWatch::new(config));
                }
            }
        }
    }

    /// The configs of the watched models, by name.
    pub fn models(&self) -> impl Iterator<Item = &ModelConfig> {
        self.models.values().map(|w| &w.config)
    }

    /// The names under `model`'s base path that are being ignored because they are not
    /// version directories (each was logged once when it appeared); `None` for a model
    /// that is not watched.
    pub fn ignored(&self, model: &ModelName) -> Option<&BTreeSet<String>> {
        self.models.get(model).map(|w| &w.ignored)
    }

    /// Why `model`'s last published versions are being kept (its base path cannot be
    /// read or holds no complete version); `None` when it is healthy or not watched.
    pub fn problem(&self, model: &ModelName) -> Option<&str> {
        self.models.get(model).and_then(ModelWatch::problem)
    }

    /// Polls every model once and publishes what changed; removes the keys of models
    /// that left the config. Problems are logged, never returned: a poll always
    /// completes, and what failed is retried on the next one.
    pub async fn poll_once(&mut self, registry: &dyn Registry) {
        for name in std::mem::take(&mut self.to_remove) {
            if let Err(e) = registry.remove_model(&name).await {
                warn!(model = %name, "could not remove model {name} from the registry: {e}; retrying next poll");
                self.to_remove.insert(name);
            }
        }
        futures::future::join_all(self.models.values_mut().map(|w| w.poll(registry))).await;
    }

    /// Whether some model has a version directory that needs another poll to settle.
    fn settling(&self) -> bool {
        self.models.values().any(ModelWatch::settling)
    }

    /// Polls every `poll_interval` until `shutdown` completes. A `poll_interval` of zero
    /// is TF Serving's `--file_system_poll_wait_seconds=0`, "load once at startup": it
    /// polls at startup (and when the models change through a [`ModelsHandle`]) every
    /// [`SETTLE_POLL`] until every version directory it found has listed the same twice,
    /// so what was there at startup is served, then stops polling. A poll in progress is
    /// abandoned at shutdown.
    pub async fn run(
        mut self,
        registry: Arc<dyn Registry>,
        poll_interval: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = self.poll_once(registry.as_ref()) => {}
            }
            let wait = match (poll_interval.is_zero(), self.settling()) {
                (false, _) => Some(poll_interval),
                (true, true) => Some(SETTLE_POLL),
                (true, false) => None,
            };
            let next_tick = async {
                match wait {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => return,
                () = next_tick => {}
                // Never fails: `self.handle` keeps a sender alive.
                Ok(()) = self.updates.changed() => {
                    let models = self.updates.borrow_and_update().clone();
                    self.set_models(models);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspire_registry::MemoryRegistry;

    fn model(name: &str, base: &std::path::Path) -> ModelConfig {
        ModelConfig::single(name, base.to_str().unwrap()).unwrap()
    }

    fn write_version(base: &std::path::Path, v: u32) {
        let dir = base.join(v.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.pt"), b"weights").unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn run_polls_on_interval_and_applies_model_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        write_version(&a, 1);
        write_version(&b, 2);
        let registry = Arc::new(MemoryRegistry::default());
        let mut state = registry.subscribe();
        let poller = StoragePoller::new(vec![model("a", &a)]);
        let handle = poller.handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(poller.run(registry.clone(), Duration::from_secs(1), async {
            let _ = stopped.await;
        }));
        let name_a = ModelName::new("a").unwrap();
        let name_b = ModelName::new("b").unwrap();
        // Two polls one interval apart make version 1 complete (time is paused and
        // auto-advances, so this waits on the poller, not on the clock).
        state
            .wait_for(|s| s.models.get(&name_a).is_some_and(|m| m.aspired.is_some()))
            .await
            .unwrap();
        handle.set_models(vec![model("b", &b)]);
        let s = state
            .wait_for(|s| {
                !s.models.contains_key(&name_a)
                    && s.models.get(&name_b).is_some_and(|m| m.aspired.is_some())
            })
            .await
            .unwrap()
            .clone();
        assert_eq!(
            s.models[&name_b].aspired.as_ref().unwrap().versions[0].get(),
            2
        );
        stop.send(()).unwrap();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn zero_interval_serves_what_was_there_at_startup_then_stops_polling() {
        let tmp = tempfile::tempdir().unwrap();
        let (m, control) = (tmp.path().join("m"), tmp.path().join("c"));
        write_version(&m, 1);
        write_version(&control, 1);
        let registry = Arc::new(MemoryRegistry::default());
        let mut state = registry.subscribe();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let once = StoragePoller::new(vec![model("m", &m)]);
        let once = tokio::spawn(once.run(
            registry.clone(),
            Duration::ZERO,
            until_stopped(stopped.clone()),
        ));
        // A control that polls every second, to prove time for polls has passed.
        let every = StoragePoller::new(vec![model("c", &control)]);
        let every = tokio::spawn(every.run(
            registry.clone(),
            Duration::from_secs(1),
            until_stopped(stopped),
        ));
        let (name_m, name_c) = (ModelName::new("m").unwrap(), ModelName::new("c").unwrap());
        let served = |s: &aspire_core::ClusterState, name: &ModelName| {
            s.models
                .get(name)
                .and_then(|m| m.available.as_ref())
                .map(|a| a.numbers().iter().map(|v| v.get()).collect::<Vec<_>>())
        };
        // What was there at startup is served: the startup polls repeat until it settles.
        tokio::time::timeout(
            Duration::from_secs(20),
            state.wait_for(|s| served(s, &name_m) == Some(vec![1])),
        )
        .await
        .expect("v1 published with a zero interval")
        .unwrap();
        // Then it stops polling: a version added later is not seen, though the control
        // poller (every second) sees its own new version, which takes two polls.
        write_version(&m, 2);
        write_version(&control, 2);
        let s = tokio::time::timeout(
            Duration::from_secs(20),
            state.wait_for(|s| served(s, &name_c) == Some(vec![1, 2])),
        )
        .await
        .expect("the control saw v2")
        .unwrap()
        .clone();
        assert_eq!(served(&s, &name_m), Some(vec![1]));
        assert!(!once.is_finished());
        stop.send(true).unwrap();
        once.await.unwrap();
        every.await.unwrap();
    }
}
