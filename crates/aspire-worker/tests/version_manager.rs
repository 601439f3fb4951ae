//! The version manager against real LibTorch, real TorchScript files in a `file://`
//! storage directory and the in-memory registry: loads, swaps, rollbacks by pin, failed
//! loads and their retries, removal and shutdown.
//!
//! Version k of every test model answers `x * k`, so an answer tells which version ran.
//! `ASPIRE_TEST_PYTHON` picks a Python with torch 2.11.0 other than the workspace's `.venv`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use aspire_core::{
    AspiredVersions, AvailableVersion, AvailableVersions, ModelName, SignatureMap, Version,
    VersionState, VersionStatus, WorkerRecord,
};
use aspire_registry::{MemoryRegistry, Registry};
use aspire_worker::batcher::{BatchConfig, BatchError};
use aspire_worker::model::{DeviceSpec, configure_threads};
use aspire_worker::storage_roots::StorageRoots;
use aspire_worker::tensor::HostTensor;
use aspire_worker::version_manager::{LoadedVersion, ManagerConfig, ModelEntry, VersionManager};
use tempfile::TempDir;

const WORKER_ID: &str = "worker-under-test";
const ADDRESS: &str = "10.1.2.3:8500";
const LIMIT: Duration = Duration::from_secs(60);
/// The test workers' slow-pass threshold.
const SLOW_PASS: Duration = Duration::from_secs(1);

/// A registry whose writes of worker records never return, as over a stalled etcd
/// connection; everything else goes to the in-memory registry it wraps.
struct HangingWrites(Arc<MemoryRegistry>);

#[async_trait::async_trait]
impl Registry for HangingWrites {
    async fn put_available(
        &self,
        model: &ModelName,
        value: &AvailableVersions,
    ) -> aspire_registry::Result<()> {
        self.0.put_available(model, value).await
    }
    async fn put_aspired(
        &self,
        model: &ModelName,
        value: &AspiredVersions,
    ) -> aspire_registry::Result<()> {
        self.0.put_aspired(model, value).await
    }
    async fn set_pinned(
        &self,
        model: &ModelName,
        pin: Option<&str>,
    ) -> aspire_registry::Result<()> {
        self.0.set_pinned(model, pin).await
    }
    async fn remove_model(&self, model: &ModelName) -> aspire_registry::Result<()> {
        self.0.remove_model(model).await
    }
    async fn put_worker(&self, _: &str, _: &WorkerRecord) -> aspire_registry::Result<()> {
        futures::future::pending().await
    }
    async fn remove_worker(&self, _: &str) -> aspire_registry::Result<()> {
        futures::future::pending().await
    }
    async fn put_raw(&self, key: &str, value: Option<&[u8]>) -> aspire_registry::Result<()> {
        self.0.put_raw(key, value).await
    }
    async fn state(&self) -> aspire_registry::Result<aspire_core::ClusterState> {
        self.0.state().await
    }
    fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<aspire_core::ClusterState>> {
        self.0.subscribe()
    }
    fn schema(&self) -> &aspire_core::keys::KeySchema {
        self.0.schema()
    }
}

/// Makes the fault model with `scripts/make_fault_model.py` (once per test binary) and
/// returns its `model.pt`.
fn fault_model() -> &'static Path {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let out = modules().join("fault");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let run = Command::new(python())
            .arg(root.join("scripts/make_fault_model.py"))
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "make_fault_model.py failed: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        out.join("1/model.pt")
    })
}

/// The fault model's signature (as the script writes it).
const FAULT_SIG: &str = r#"{"signatures": {"serving_default": {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 4]}]}}}"#;

fn python() -> PathBuf {
    std::env::var_os("ASPIRE_TEST_PYTHON").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python"),
        PathBuf::from,
    )
}

/// `Scale(k)` answers `x * k`; `Slow(k)` too, after `x[0, 0]` rounds of a matmul, so a
/// request can be kept in flight for a while (warm-up sends zeros: no rounds).
const MODULES_PY: &str = r#"
import os, sys, torch

class Scale(torch.nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, x):
        return x * self.k

class Slow(torch.nn.Module):
    def __init__(self, k: float):
        super().__init__()
        self.k = k
        self.w = torch.full((256, 256), 1e-3)

    def forward(self, x):
        acc = torch.zeros(256, 256)
        for _ in range(int(x[0, 0])):
            acc = acc + self.w @ self.w
        return x * self.k + acc.sum() * 0.0

out = sys.argv[1]
for k in (1, 2):
    torch.jit.script(Scale(float(k))).save(os.path.join(out, f"scale{k}.pt"))
torch.jit.script(Slow(1.0)).save(os.path.join(out, "slow1.pt"))
"#;

/// The signature every test model is published with.
const SIG: &str = r#"{"signatures": {"predict": {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]}}}"#;

/// Claims a float64 output the modules do not return.
const FLOAT64_SIG: &str = r#"{"signatures": {"predict": {
    "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3]}],
    "outputs": [{"name": "y", "dtype": "float64", "shape": [-1, 3]}]}}}"#;

/// Scripts the modules once per test binary, and sets LibTorch to one thread (the tests
/// run in parallel on few cores).
fn modules() -> &'static Path {
    static DIR: OnceLock<TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        configure_threads(Some(1), Some(1));
        let python = python();
        assert!(
            python.exists(),
            "{} is missing: run `make setup` to make the venv",
            python.display()
        );
        let dir = TempDir::new().unwrap();
        // torch.jit.script reads the module's source, so it must come from a file.
        let script = dir.path().join("modules.py");
        std::fs::write(&script, MODULES_PY).unwrap();
        let out = Command::new(&python)
            .arg(&script)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripting failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
    .path()
}

fn v(n: u64) -> Version {
    Version::new(n).unwrap()
}

fn name(model: &str) -> ModelName {
    ModelName::new(model).unwrap()
}

/// What version `k` answers for the input row `[first, 1, 2]`.
fn scaled(k: u64, first: f32) -> Vec<f32> {
    [first, 1.0, 2.0].iter().map(|x| x * k as f32).collect()
}

/// Sends one row `[first, 1, 2]` to `lv` as a request handler does: holding the `Arc`
/// from `pick` until the answer comes.
async fn ask(lv: &LoadedVersion, first: f32) -> Result<Vec<f32>, BatchError> {
    let (_, sig) = lv.signature("").unwrap();
    let input = HostTensor::from_f32(vec![1, 3], &[first, 1.0, 2.0]);
    let out = lv.batcher.submit(sig, vec![input], None).await?;
    Ok(out[0].to_f32().unwrap())
}

/// Asks `lv` and checks the answer came from its own module.
async fn ask_checked(lv: &LoadedVersion) {
    let got = ask(lv, 3.0)
        .await
        .unwrap_or_else(|e| panic!("version {} failed a request: {e}", lv.version));
    assert_eq!(got, scaled(lv.version.get(), 3.0), "version {}", lv.version);
}

/// What the tests look at in a model's entry, without its `Arc`s: holding one keeps that
/// version from unloading, as an in-flight request does.
#[derive(Debug, Clone, PartialEq)]
struct View {
    desired: Vec<Version>,
    statuses: BTreeMap<Version, VersionStatus>,
    loaded: Vec<Version>,
    default: Option<Version>,
}

impl View {
    fn of(entry: &ModelEntry) -> Self {
        Self {
            desired: entry.desired.clone(),
            statuses: entry.statuses.clone(),
            loaded: entry.loaded.keys().copied().collect(),
            default: entry.default_version(),
        }
    }

    fn state(&self, version: u64) -> Option<VersionState> {
        self.statuses.get(&v(version)).map(|s| s.state)
    }

    fn error(&self, version: u64) -> Option<&str> {
        self.statuses.get(&v(version))?.error.as_deref()
    }
}

/// Polls `probe` until it returns `Ok`; its `Err` says what was seen instead, for the
/// message when `limit` passes.
async fn eventually<T>(
    what: &str,
    limit: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let started = Instant::now();
    loop {
        match probe() {
            Ok(found) => return found,
            Err(seen) if started.elapsed() > limit => {
                panic!("{what}: not within {limit:?}; last seen: {seen}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// A version manager on its own registry, storage directory and cache directory.
struct Worker {
    dir: TempDir,
    registry: Arc<MemoryRegistry>,
    manager: Arc<VersionManager>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Worker {
    fn start() -> Self {
        Self::start_with_grace(Duration::ZERO)
    }

    fn start_with_grace(unload_grace: Duration) -> Self {
        Self::start_with(unload_grace, LIMIT, false)
    }

    /// A worker whose unloads wait at most `unload_drain` for requests in flight; with
    /// `hang_writes`, its writes of its record never return (a stalled etcd).
    fn start_with(unload_grace: Duration, unload_drain: Duration, hang_writes: bool) -> Self {
        modules();
        let dir = TempDir::new().unwrap();
        let registry = Arc::new(MemoryRegistry::default());
        let seen_by_manager: Arc<dyn Registry> = if hang_writes {
            Arc::new(HangingWrites(registry.clone()))
        } else {
            registry.clone()
        };
        let config = ManagerConfig {
            worker_id: WORKER_ID.to_string(),
            advertise_address: ADDRESS.to_string(),
            device: DeviceSpec::Cpu,
            batching: BatchConfig {
                enabled: true,
                max_batch_size: 8,
                batch_timeout: Duration::ZERO,
                max_enqueued_batches: 16,
                max_enqueued_bytes: usize::MAX,
                num_batch_threads: 1,
                allowed_batch_sizes: Vec::new(),
            },
            warmup_batch_sizes: vec![1, 2],
            cache_dir: dir.path().join("cache"),
            storage_roots: StorageRoots::parse(
                &[dir.path().join("storage").display().to_string()],
                "--storage-root",
            )
            .unwrap(),
            load_retry_initial: Duration::from_millis(200),
            load_retry_max: Duration::from_secs(1),
            unload_grace,
            unload_drain,
            slow_pass: SLOW_PASS,
            batch_pool: None,
            metrics: Default::default(),
        };
        let (manager, handle) = VersionManager::start(config, "cpu".into(), seen_by_manager);
        Self {
            dir,
            registry,
            manager,
            handle: Some(handle),
        }
    }

    fn version_dir(&self, model: &str, version: u64) -> PathBuf {
        self.dir
            .path()
            .join("storage")
            .join(model)
            .join(version.to_string())
    }

    /// Puts a version in storage: `module`'s file as `model.pt`, and `signature.json`.
    fn store(&self, model: &str, version: u64, module: &str, sig: &str) -> AvailableVersion {
        let dir = self.version_dir(model, version);
        std::fs::create_dir_all(&dir).unwrap();
        let file = match module {
            "fault" => fault_model().to_path_buf(),
            _ => modules().join(format!("{module}.pt")),
        };
        std::fs::copy(file, dir.join("model.pt")).unwrap();
        std::fs::write(dir.join("signature.json"), sig).unwrap();
        AvailableVersion {
            version: v(version),
            path: format!("file://{}", dir.display()),
            signatures: SignatureMap::from_json(sig.as_bytes()).unwrap(),
        }
    }

    async fn publish(&self, model: &str, versions: Vec<AvailableVersion>) {
        let value = AvailableVersions { versions };
        self.registry
            .put_available(&name(model), &value)
            .await
            .unwrap();
    }

    async fn aspire(&self, model: &str, versions: &[u64]) {
        let value = AspiredVersions {
            versions: versions.iter().copied().map(v).collect(),
        };
        self.registry
            .put_aspired(&name(model), &value)
            .await
            .unwrap();
    }

    async fn pin(&self, model: &str, pin: Option<&str>) {
        self.registry.set_pinned(&name(model), pin).await.unwrap();
    }

    fn view(&self, model: &str) -> Option<View> {
        self.manager.table().models.get(&name(model)).map(View::of)
    }

    /// The model's view once `ok` holds for it.
    async fn view_when(
        &self,
        model: &str,
        what: &str,
        limit: Duration,
        ok: impl Fn(&View) -> bool,
    ) -> View {
        eventually(what, limit, || match self.view(model) {
            Some(view) if ok(&view) => Ok(view),
            Some(view) => Err(format!("{view:?}")),
            None => Err(format!("no entry for model {model}")),
        })
        .await
    }

    async fn available(&self, model: &str, version: u64) -> View {
        self.view_when(
            model,
            &format!("{model} version {version} AVAILABLE"),
            LIMIT,
            |view| view.state(version) == Some(VersionState::Available),
        )
        .await
    }

    fn pick(&self, model: &str, version: Option<u64>) -> Result<Arc<LoadedVersion>, String> {
        let table = self.manager.table();
        let (model, entry) = table.model(model).map_err(|e| e.to_string())?;
        entry.pick(model, version.map(v)).map_err(|e| e.to_string())
    }

    fn default_version(&self, model: &str) -> Arc<LoadedVersion> {
        self.pick(model, None)
            .unwrap_or_else(|e| panic!("no default version of {model}: {e}"))
    }

    fn record(&self) -> Option<WorkerRecord> {
        self.registry
            .subscribe()
            .borrow()
            .workers
            .get(WORKER_ID)
            .cloned()
    }

    /// Publishes `model` with version 1 (`scale1`) available and aspired, and waits until
    /// it is AVAILABLE.
    async fn serve_v1(&self, model: &str) -> Vec<AvailableVersion> {
        let available = vec![self.store(model, 1, "scale1", SIG)];
        self.publish(model, available.clone()).await;
        self.aspire(model, &[1]).await;
        self.available(model, 1).await;
        available
    }

    /// Follows a change of `model`'s default version from `from` to `to`, already asked
    /// for in the registry, through every table snapshot the tight loop sees until `from`
    /// is END: there is a default version in each one, it stays `from` until `to` is
    /// AVAILABLE, and `from` unloads only after that. Returns how many snapshots it saw,
    /// and in how many of them `from` served while `to` was not AVAILABLE yet.
    async fn follow_handover(&self, model: &str, from: u64, to: u64) -> (usize, usize) {
        let model_name = name(model);
        let started = Instant::now();
        let (mut seen, mut bridged) = (0usize, 0usize);
        loop {
            seen += 1;
            let (lv, from_state, to_state) = {
                let table = self.manager.table();
                let entry = &table.models[&model_name];
                let lv = entry.pick(&model_name, None).unwrap_or_else(|e| {
                    panic!(
                        "snapshot {seen}: no default version: {e}; statuses {:?}",
                        entry.statuses
                    )
                });
                let view = View::of(entry);
                (lv, view.state(from), view.state(to))
            };
            if to_state != Some(VersionState::Available) {
                bridged += 1;
                assert_eq!(
                    lv.version,
                    v(from),
                    "snapshot {seen}: default left {from} while {to} is {to_state:?}"
                );
            }
            if matches!(
                from_state,
                Some(VersionState::Unloading | VersionState::End)
            ) {
                assert_eq!(
                    to_state,
                    Some(VersionState::Available),
                    "snapshot {seen}: {from} is {from_state:?} before {to} is AVAILABLE"
                );
            }
            // Requests now and then: a picked version must still answer, whatever the
            // manager does meanwhile.
            if seen % 8 == 0 {
                ask_checked(&lv).await;
            }
            if from_state == Some(VersionState::End) && lv.version == v(to) {
                return (seen, bridged);
            }
            drop(lv);
            assert!(
                started.elapsed() < LIMIT,
                "the handover from {from} to {to} did not finish within {LIMIT:?}"
            );
            tokio::task::yield_now().await;
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.manager.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_warms_up_and_serves_the_aspired_version() {
    let w = Worker::start();
    w.serve_v1("m").await;

    let lv = w.default_version("m");
    assert_eq!(lv.version, v(1));
    assert_eq!(ask(&lv, 5.0).await.unwrap(), scaled(1, 5.0));
    assert_eq!(w.pick("m", Some(1)).unwrap().version, v(1));
    let err = w.pick("m", Some(2)).err().unwrap();
    assert!(err.contains("version 2 is not loaded"), "{err}");
    assert_eq!(w.view("m").unwrap().desired, vec![v(1)]);
    // Loaded from the local cache, not from storage.
    assert!(w.dir.path().join("cache/m/1/model.pt").is_file());

    let record = eventually(
        "the worker record shows version 1 AVAILABLE",
        LIMIT,
        || match w.record() {
            Some(r) if r.available_versions(&name("m")) == vec![v(1)] => Ok(r),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert_eq!(
        (record.address.as_str(), record.device.as_str()),
        (ADDRESS, "cpu")
    );
    assert_eq!(record.models[&name("m")][&v(1)].error, None);
    eventually("ready", LIMIT, || {
        if *w.manager.ready().borrow() {
            Ok(())
        } else {
            Err("not ready".into())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_aspired_version_replaces_the_old_without_a_gap() {
    let w = Worker::start();
    let mut available = w.serve_v1("m").await;
    available.push(w.store("m", 2, "scale2", SIG));
    w.publish("m", available).await;
    w.aspire("m", &[2]).await;

    let (seen, bridged) = w.follow_handover("m", 1, 2).await;
    eprintln!("swap: {seen} snapshots, {bridged} of them served by 1 while 2 loaded");

    let lv = w.default_version("m");
    assert_eq!(ask(&lv, 4.0).await.unwrap(), scaled(2, 4.0));
    assert_eq!(w.view("m").unwrap().loaded, vec![v(2)]);
    let err = w.pick("m", Some(1)).err().unwrap();
    assert!(err.contains("version 1 is END"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_finish_before_the_old_version_unloads() {
    let w = Worker::start();
    let mut available = vec![w.store("m", 1, "slow1", SIG)];
    w.publish("m", available.clone()).await;
    w.aspire("m", &[1]).await;
    w.available("m", 1).await;

    let v1 = w.default_version("m");
    // Held the way a handler holds a version between `pick` and its reply.
    let held = v1.clone();
    let manager = w.manager.clone();
    let slow = tokio::spawn(async move {
        // Some 2 s of matmuls on one thread.
        let answer = ask(&v1, 5000.0).await;
        let state_when_answered = View::of(&manager.table().models[&name("m")]).state(1);
        drop(v1);
        (answer, state_when_answered)
    });

    available.push(w.store("m", 2, "scale2", SIG));
    w.publish("m", available).await;
    w.aspire("m", &[2]).await;
    w.view_when(
        "m",
        "version 2 AVAILABLE and version 1 draining",
        LIMIT,
        |view| {
            view.state(2) == Some(VersionState::Available)
                && view.state(1) == Some(VersionState::Unloading)
        },
    )
    .await;
    assert_eq!(w.default_version("m").version, v(2));
    // Unloading has begun, yet the version takes requests until nobody holds it.
    assert_eq!(ask(&held, 7.0).await.unwrap(), scaled(1, 7.0));

    let (answer, state_when_answered) = slow.await.unwrap();
    assert_eq!(answer.unwrap(), scaled(1, 5000.0));
    assert_ne!(state_when_answered, Some(VersionState::End));
    assert_eq!(w.view("m").unwrap().state(1), Some(VersionState::Unloading));

    drop(held);
    w.view_when("m", "version 1 END", LIMIT, |view| {
        view.state(1) == Some(VersionState::End)
    })
    .await;
}

/// A version whose location in the registry is outside the storage roots (here
/// `<dir>/storage`) is END with the refusal, never fetched, and the old version keeps
/// serving; once the registry names a location under the roots, it loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_location_outside_the_storage_roots_is_refused_until_the_registry_moves_it() {
    let w = Worker::start();
    let mut available = w.serve_v1("m").await;
    // A valid version 2, beside the storage root rather than in it.
    let outside = w.dir.path().join("storage-evil/m/2");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::copy(modules().join("scale2.pt"), outside.join("model.pt")).unwrap();
    let mut v2 = w.store("m", 2, "scale2", SIG);
    let inside = std::mem::replace(&mut v2.path, format!("file://{}", outside.display()));
    available.push(v2.clone());
    w.publish("m", available.clone()).await;
    w.aspire("m", &[2]).await;

    let view = w
        .view_when("m", "version 2 refused", LIMIT, |view| {
            view.state(2) == Some(VersionState::End) && view.error(2).is_some()
        })
        .await;
    let expected = format!(
        "location {} of m version 2 is outside the storage roots (--storage-root file://{}); not loaded",
        v2.path,
        w.dir.path().join("storage").display()
    );
    assert_eq!(view.error(2), Some(expected.as_str()));
    assert_eq!(view.default, Some(v(1)));
    ask_checked(&w.default_version("m")).await;
    assert!(
        !w.dir.path().join("cache/m/2").exists(),
        "the refused version was fetched"
    );
    eventually("the worker record shows the refusal", LIMIT, || {
        let record = w.record().ok_or("no record")?;
        match record.models.get(&name("m")).and_then(|m| m.get(&v(2))) {
            Some(status) if status.error.as_deref() == Some(expected.as_str()) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // The registry moves version 2 under the roots: it loads and takes over.
    available[1].path = inside;
    w.publish("m", available).await;
    let view = w.available("m", 2).await;
    assert_eq!(view.error(2), None);
    assert_eq!(
        ask(&w.default_version("m"), 2.0).await.unwrap(),
        scaled(2, 2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_version_fails_keeps_the_old_one_and_loads_once_fixed() {
    let w = Worker::start();
    let mut available = w.serve_v1("m").await;
    available.push(w.store("m", 2, "scale2", SIG));
    let model_pt = w.version_dir("m", 2).join("model.pt");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    std::fs::write(&model_pt, noise).unwrap();
    w.publish("m", available).await;
    w.aspire("m", &[2]).await;

    let view = w
        .view_when("m", "version 2 failed", LIMIT, |view| {
            view.state(2) == Some(VersionState::End) && view.error(2).is_some()
        })
        .await;
    let error = view.error(2).unwrap();
    assert!(error.contains("model.pt"), "{error}");
    assert_eq!(view.state(1), Some(VersionState::Available));
    assert_eq!(view.default, Some(v(1)));
    ask_checked(&w.default_version("m")).await;
    eventually("the worker record shows the failure", LIMIT, || {
        let record = w.record().ok_or("no record")?;
        let status = record
            .models
            .get(&name("m"))
            .and_then(|m| m.get(&v(2)))
            .ok_or("no status of version 2")?;
        match &status.error {
            Some(e) if e.contains("model.pt") => Ok(()),
            _ => Err(format!("{status:?}")),
        }
    })
    .await;

    // Renamed into place, so no retry reads a half-written file.
    let staged = w.dir.path().join("storage/fixed.pt");
    std::fs::copy(modules().join("scale2.pt"), &staged).unwrap();
    std::fs::rename(&staged, &model_pt).unwrap();
    let view = w.available("m", 2).await;
    assert_eq!(view.error(2), None);
    assert_eq!(
        ask(&w.default_version("m"), 2.0).await.unwrap(),
        scaled(2, 2.0)
    );
    w.view_when("m", "version 1 END", LIMIT, |view| {
        view.state(1) == Some(VersionState::End)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_rolls_back_once_the_pinned_version_is_available() {
    let w = Worker::start();
    let available = vec![
        w.store("m", 1, "scale1", SIG),
        w.store("m", 2, "scale2", SIG),
    ];
    w.publish("m", available).await;
    w.aspire("m", &[2]).await;
    let view = w.available("m", 2).await;
    assert_eq!(view.loaded, vec![v(2)]);

    w.pin("m", Some("1")).await;
    let (seen, bridged) = w.follow_handover("m", 2, 1).await;
    eprintln!("rollback: {seen} snapshots, {bridged} of them served by 2 while 1 loaded");
    assert_eq!(w.view("m").unwrap().desired, vec![v(1)]);

    w.pin("m", None).await;
    let (seen, bridged) = w.follow_handover("m", 1, 2).await;
    eprintln!("unpin: {seen} snapshots, {bridged} of them served by 1 while 2 loaded");
    assert_eq!(w.view("m").unwrap().desired, vec![v(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_among_loaded_versions_switches_the_default_at_once() {
    let w = Worker::start();
    let available = vec![
        w.store("m", 1, "scale1", SIG),
        w.store("m", 2, "scale2", SIG),
    ];
    w.publish("m", available).await;
    // As the latest-2 policy aspires them.
    w.aspire("m", &[1, 2]).await;
    let view = w
        .view_when("m", "both versions AVAILABLE", LIMIT, |view| {
            view.loaded.len() == 2
        })
        .await;
    assert_eq!(view.default, Some(v(2)));

    w.pin("m", Some("1")).await;
    // Version 1 needs no load, so the first table that knows of the pin already sends
    // requests to it; the limit only covers the actor noticing the registry change.
    let view = w
        .view_when("m", "the pin seen", Duration::from_secs(5), |view| {
            view.desired == vec![v(1)]
        })
        .await;
    assert_eq!(view.default, Some(v(1)), "{view:?}");
    assert_eq!(view.state(1), Some(VersionState::Available));
    assert_eq!(
        ask(&w.default_version("m"), 6.0).await.unwrap(),
        scaled(1, 6.0)
    );
    w.view_when("m", "version 2 END", LIMIT, |view| {
        view.state(2) == Some(VersionState::End)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_pins_change_nothing() {
    let w = Worker::start();
    let available = vec![
        w.store("m", 1, "scale1", SIG),
        w.store("m", 2, "scale2", SIG),
    ];
    w.publish("m", available).await;
    w.aspire("m", &[1, 2]).await;
    let before = w
        .view_when("m", "both versions AVAILABLE", LIMIT, |view| {
            view.loaded.len() == 2
        })
        .await;
    let record_before = eventually("the record lists both", LIMIT, || match w.record() {
        Some(r) if r.available_versions(&name("m")).len() == 2 => Ok(r),
        other => Err(format!("{other:?}")),
    })
    .await;

    for (round, pin) in ["3", "garbage", "1,3", "", "0", "-1"]
        .into_iter()
        .enumerate()
    {
        w.pin("m", Some(pin)).await;
        // A later write to another model: once the table shows it, the manager has
        // acted on the state that holds the pin too.
        let marker = round as u64 + 1;
        w.aspire("marker", &[marker]).await;
        w.view_when("marker", "the marker seen", LIMIT, |view| {
            view.desired == vec![v(marker)]
        })
        .await;
        assert_eq!(w.view("m").unwrap(), before, "pin {pin:?}");
        ask_checked(&w.default_version("m")).await;
        assert_eq!(
            w.record().unwrap().models[&name("m")],
            record_before.models[&name("m")],
            "pin {pin:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_model_unloads_and_leaves_the_table() {
    let w = Worker::start();
    w.serve_v1("gone").await;
    w.serve_v1("stays").await;
    // remove_model keeps an operator's pin; it must not keep the model.
    w.pin("gone", Some("1")).await;
    let gone = Arc::downgrade(&w.default_version("gone"));

    w.registry.remove_model(&name("gone")).await.unwrap();
    eventually("gone left the table", LIMIT, || match w.view("gone") {
        None => Ok(()),
        Some(view) => Err(format!("{view:?}")),
    })
    .await;
    let err = w.pick("gone", None).err().unwrap();
    assert!(err.contains("not found") || err.contains("gone"), "{err}");
    assert!(
        gone.upgrade().is_none(),
        "version 1 of gone is still loaded"
    );
    eventually("gone left the worker record", LIMIT, || match w.record() {
        Some(r) if !r.models.contains_key(&name("gone")) => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;

    assert_eq!(
        w.view("stays").unwrap().state(1),
        Some(VersionState::Available)
    );
    ask_checked(&w.default_version("stays")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signature_mismatch_fails_only_that_version() {
    let w = Worker::start();
    w.serve_v1("good").await;
    let typed = vec![w.store("typed", 1, "scale1", FLOAT64_SIG)];
    w.publish("typed", typed).await;
    w.aspire("typed", &[1]).await;

    let view = w
        .view_when("typed", "version 1 of typed failed", LIMIT, |view| {
            view.state(1) == Some(VersionState::End) && view.error(1).is_some()
        })
        .await;
    let error = view.error(1).unwrap();
    assert!(
        error.contains("output 'y'") && error.contains("DT_DOUBLE"),
        "{error}"
    );
    assert!(view.loaded.is_empty());
    assert!(w.pick("typed", None).is_err());

    let good = w.view("good").unwrap();
    assert_eq!(good.state(1), Some(VersionState::Available));
    assert_eq!(good.error(1), None);
    ask_checked(&w.default_version("good")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_unloads_everything_and_deregisters() {
    let mut w = Worker::start();
    w.serve_v1("m").await;
    eventually("registered", LIMIT, || {
        w.record().ok_or_else(|| "no record".to_string())
    })
    .await;
    let v1 = Arc::downgrade(&w.default_version("m"));

    w.manager.shutdown();
    let handle = w.handle.take().unwrap();
    tokio::time::timeout(LIMIT, handle)
        .await
        .expect("the manager did not stop")
        .expect("the manager's task failed");

    let state = w.registry.state().await.unwrap();
    assert!(
        !state.workers.contains_key(WORKER_ID),
        "{:?}",
        state.workers
    );
    assert!(w.record().is_none());
    let view = w.view("m").unwrap();
    assert!(view.loaded.is_empty());
    assert_eq!(view.state(1), Some(VersionState::End));
    assert!(v1.upgrade().is_none(), "version 1 is still loaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unloading_version_answers_requests_naming_it_during_its_grace() {
    // Far longer than the test, so the grace cannot end while it is checked.
    let w = Worker::start_with_grace(Duration::from_secs(600));
    let mut available = w.serve_v1("m").await;
    available.push(w.store("m", 2, "scale2", SIG));
    w.publish("m", available).await;
    w.aspire("m", &[2]).await;
    w.view_when("m", "version 1 UNLOADING", LIMIT, |view| {
        view.state(1) == Some(VersionState::Unloading)
    })
    .await;

    assert_eq!(w.default_version("m").version, v(2));
    let v1 = w.pick("m", Some(1)).unwrap();
    assert_eq!(ask(&v1, 8.0).await.unwrap(), scaled(1, 8.0));
    eventually("the record shows version 1 UNLOADING", LIMIT, || {
        let record = w.record().ok_or("no record")?;
        let states: Vec<_> = record.models[&name("m")]
            .values()
            .map(|s| s.state)
            .collect();
        if states == [VersionState::Unloading, VersionState::Available] {
            Ok(())
        } else {
            Err(format!("{states:?}"))
        }
    })
    .await;

    // Once a short grace is over, the version unloads and requests naming it fail.
    let w = Worker::start_with_grace(Duration::from_millis(100));
    let mut available = w.serve_v1("m").await;
    available.push(w.store("m", 2, "scale2", SIG));
    w.publish("m", available).await;
    w.aspire("m", &[2]).await;
    w.view_when("m", "version 1 END", LIMIT, |view| {
        view.state(1) == Some(VersionState::End)
    })
    .await;
    let err = w.pick("m", Some(1)).err().unwrap();
    assert!(err.contains("version 1 is END"), "{err}");
}

/// The record goes to the registry from a task of its own: with every write of it hung
/// (a stalled etcd), versions still load, swap and serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_registry_write_never_holds_up_loads_or_swaps() {
    let w = Worker::start_with(Duration::ZERO, LIMIT, true);
    let mut available = w.serve_v1("m").await;
    ask_checked(&w.default_version("m")).await;
    available.push(w.store("m", 2, "scale2", SIG));
    w.publish("m", available).await;
    w.aspire("m", &[2]).await;
    w.view_when("m", "version 2 AVAILABLE, version 1 END", LIMIT, |view| {
        view.state(2) == Some(VersionState::Available) && view.state(1) == Some(VersionState::End)
    })
    .await;
    ask_checked(&w.default_version("m")).await;
    assert_eq!(w.record(), None, "no write can have gone through");
    // Deregistration is bounded too.
    let started = Instant::now();
    w.manager.deregister().await;
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// A request stuck in a forward pass does not keep its version loaded past the drain
/// limit: it is answered at once with `VersionDropped`, the version goes END, and the
/// slow pass (still running on its thread) shows in the record until it returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_request_is_answered_at_the_drain_limit_and_the_version_dropped() {
    let drain = Duration::from_millis(300);
    let w = Worker::start_with(Duration::ZERO, drain, false);
    let mut available = vec![w.store("m", 1, "slow1", SIG)];
    w.publish("m", available.clone()).await;
    w.aspire("m", &[1]).await;
    w.available("m", 1).await;

    let v1 = w.default_version("m");
    let stuck = tokio::spawn(async move {
        // Some 10 s of matmuls on one thread (0.4 s per 5000 on this 2-core VM): far
        // past the drain limit.
        let answer = ask(&v1, 120_000.0).await;
        (answer, Instant::now())
    });
    eventually("the slow pass is running", LIMIT, || {
        match w.pick("m", Some(1)) {
            Ok(lv) if lv.batcher.running_passes() == 1 => Ok(()),
            other => Err(format!("{:?}", other.map(|lv| lv.batcher.running_passes()))),
        }
    })
    .await;
    let record = eventually("the record shows the slow pass", LIMIT, || {
        match w.record() {
            Some(r)
                if r.slow_passes
                    .iter()
                    .any(|s| s.version == v(1) && s.running == 1) =>
            {
                Ok(r)
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(record.slow_passes[0].total, 1);

    available.push(w.store("m", 2, "scale2", SIG));
    w.publish("m", available).await;
    let asked = Instant::now();
    w.aspire("m", &[2]).await;
    let (answer, answered) = tokio::time::timeout(LIMIT, stuck).await.unwrap().unwrap();
    assert_eq!(answer, Err(BatchError::VersionDropped));
    let waited = answered - asked;
    assert!(
        waited < Duration::from_secs(4),
        "answered {waited:?} after the swap began; the pass takes some 10 s"
    );
    w.view_when("m", "version 1 END", LIMIT, |view| {
        view.state(1) == Some(VersionState::End) && view.state(2) == Some(VersionState::Available)
    })
    .await;
    ask_checked(&w.default_version("m")).await;
    // The pass still runs on its thread, and still shows, until it returns.
    eventually(
        "the slow pass returns and leaves the record",
        LIMIT,
        || match w.record() {
            Some(r) if r.slow_passes.is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
}

/// One row of the fault model's input: `[first, second, 0, 0]`.
async fn ask_fault(lv: &LoadedVersion, first: f32, second: f32) -> Result<Vec<f32>, BatchError> {
    let (_, sig) = lv.signature("").unwrap();
    let input = HostTensor::from_f32(vec![1, 4], &[first, second, 0.0, 0.0]);
    let out = lv.batcher.submit(sig, vec![input], None).await?;
    Ok(out[0].to_f32().unwrap())
}

/// Real TorchScript raising on one request of a batch: the batch runs again one by one,
/// the others get their answers, and only the culprit gets the model's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raising_request_in_a_real_batch_fails_alone_with_the_models_message() {
    let w = Worker::start();
    w.publish("f", vec![w.store("f", 1, "fault", FAULT_SIG)])
        .await;
    w.aspire("f", &[1]).await;
    w.available("f", 1).await;
    let lv = w.default_version("f");
    // Holds the one batch thread (a loop of some 1 s) while the batch queues.
    let holder = {
        let lv = lv.clone();
        tokio::spawn(async move { ask_fault(&lv, -777.0, 80.0).await })
    };
    eventually("the loop pass is running", LIMIT, || {
        (lv.batcher.running_passes() == 1)
            .then_some(())
            .ok_or_else(|| "no pass".to_string())
    })
    .await;
    let before = lv.batcher.stats();
    let asks = [1.0, 2.0, -999.0, 3.0].map(|first| {
        let lv = lv.clone();
        tokio::spawn(async move { ask_fault(&lv, first, 0.0).await })
    });
    eventually("the four requests are queued", LIMIT, || {
        (lv.batcher.queued_rows() == 4)
            .then_some(())
            .ok_or_else(|| format!("{} rows queued", lv.batcher.queued_rows()))
    })
    .await;
    assert_eq!(
        holder.await.unwrap().unwrap(),
        vec![-1553.0, 161.0, 1.0, 1.0]
    );
    let mut answers = Vec::new();
    for ask in asks {
        answers.push(ask.await.unwrap());
    }
    for (i, first) in [(0, 1.0), (1, 2.0), (3, 3.0)] {
        assert_eq!(
            answers[i].as_ref().unwrap(),
            &vec![first * 2.0 + 1.0, 1.0, 1.0, 1.0]
        );
    }
    match &answers[2] {
        Err(BatchError::Model(msg)) => assert!(
            msg.contains("fault model: input row holds the raise marker -999"),
            "{msg}"
        ),
        other => panic!("expected the model's error, got {other:?}"),
    }
    let after = lv.batcher.stats();
    // The holder's pass, the batch of four that failed, then each of the four alone.
    assert_eq!(after.batches - before.batches, 6);
    assert_eq!(after.failed_batches - before.failed_batches, 2);
}

/// A Predict for `model` with one row `[first, 1, 2]`; `forwarded` sets the header a
/// router sets.
fn predict_request(
    model: &str,
    first: f32,
    forwarded: bool,
) -> tonic::Request<aspire_proto::serving::PredictRequest> {
    use aspire_proto::tensorflow::tensor_shape_proto::Dim;
    let shape = aspire_proto::TensorShapeProto {
        dim: [1, 3]
            .iter()
            .map(|&size| Dim {
                size,
                name: String::new(),
            })
            .collect(),
        unknown_rank: false,
    };
    let x = aspire_proto::TensorProto {
        dtype: 1,
        tensor_shape: Some(shape),
        float_val: vec![first, 1.0, 2.0],
        ..Default::default()
    };
    let mut req = tonic::Request::new(aspire_proto::serving::PredictRequest {
        model_spec: Some(aspire_proto::serving::ModelSpec {
            name: model.to_string(),
            ..Default::default()
        }),
        inputs: [("x".to_string(), x)].into(),
        output_filter: vec![],
    });
    if forwarded {
        req.metadata_mut()
            .insert(aspire_worker::error::FORWARDED_HEADER, "1".parse().unwrap());
    }
    req
}

/// Through the gRPC service: when a version is dropped at its drain limit, a request a
/// router forwarded gets the "version unloading" answer (UNAVAILABLE with its trailers,
/// naming the version to use instead), a direct one a plain UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_version_tells_a_router_to_send_again_and_a_client_to_retry() {
    use aspire_proto::serving::prediction_service_server::PredictionService;
    use aspire_worker::codec::OutputEncoding;
    use aspire_worker::service::{RequestLimits, ServingApi};

    let w = Worker::start_with(Duration::ZERO, Duration::from_millis(300), false);
    let mut available = vec![w.store("m", 1, "slow1", SIG)];
    w.publish("m", available.clone()).await;
    w.aspire("m", &[1]).await;
    w.available("m", 1).await;
    let api = ServingApi::new(
        w.manager.clone(),
        OutputEncoding::Typed,
        RequestLimits {
            max_request_bytes: 1 << 20,
        },
    );
    // Some 10 s in one pass, forwarded; then a direct request queued behind it.
    let forwarded = {
        let api = api.clone();
        tokio::spawn(async move { api.predict(predict_request("m", 120_000.0, true)).await })
    };
    eventually("the long pass is running", LIMIT, || {
        match w.pick("m", Some(1)) {
            Ok(lv) if lv.batcher.running_passes() == 1 => Ok(()),
            other => Err(format!("{:?}", other.map(|lv| lv.batcher.running_passes()))),
        }
    })
    .await;
    let direct = {
        let api = api.clone();
        tokio::spawn(async move { api.predict(predict_request("m", 1.0, false)).await })
    };
    eventually("the direct request is queued", LIMIT, || {
        match w.pick("m", Some(1)) {
            Ok(lv) if lv.batcher.queued_rows() == 1 => Ok(()),
            other => Err(format!("{:?}", other.map(|lv| lv.batcher.queued_rows()))),
        }
    })
    .await;

    available.push(w.store("m", 2, "scale2", SIG));
    w.publish("m", available).await;
    w.aspire("m", &[2]).await;

    let status = tokio::time::timeout(LIMIT, forwarded)
        .await
        .unwrap()
        .unwrap()
        .expect_err("the forwarded request's version was dropped");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let trailer = |name: &str| {
        status
            .metadata()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        trailer(aspire_worker::error::UNLOADING_TRAILER).as_deref(),
        Some("1")
    );
    assert_eq!(
        trailer(aspire_worker::error::DEFAULT_VERSION_TRAILER).as_deref(),
        Some("2")
    );

    let status = tokio::time::timeout(LIMIT, direct)
        .await
        .unwrap()
        .unwrap()
        .expect_err("the direct request's version was dropped");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("--unload-drain-seconds"),
        "{}",
        status.message()
    );
    assert!(
        status
            .metadata()
            .get(aspire_worker::error::UNLOADING_TRAILER)
            .is_none()
    );
}
