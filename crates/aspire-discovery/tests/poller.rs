//! The storage poller against real directories and the in-memory registry: each test
//! drives polls with `poll_once` and checks what the registry holds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aspire_core::keys::KeySchema;
use aspire_core::{
    AspiredVersions, AvailableVersions, ClusterState, ModelName, Version, VersionPolicy,
    WorkerRecord,
};
use aspire_discovery::{ModelConfig, StoragePoller, fetch_version};
use aspire_registry::{MemoryRegistry, Registry};
use tokio::sync::watch;

const SIGNATURE: &str = r#"{"signatures": {"predict_images": {
    "inputs": [{"name": "images", "dtype": "float32", "shape": [-1, 784]}],
    "outputs": [{"name": "scores", "dtype": "float32", "shape": [-1, 10]}]}}}"#;

fn name(n: &str) -> ModelName {
    ModelName::new(n).unwrap()
}

fn config(n: &str, base: &Path, policy: VersionPolicy) -> ModelConfig {
    ModelConfig {
        policy,
        ..ModelConfig::single(n, base.to_str().unwrap()).unwrap()
    }
}

fn write(base: &Path, relative: &str, bytes: &[u8]) {
    let path = base.join(relative);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// What the registry holds for `model`: (available, aspired) version numbers.
async fn published(registry: &dyn Registry, model: &str) -> (Option<Vec<u64>>, Option<Vec<u64>>) {
    let state = registry.state().await.unwrap();
    let Some(m) = state.models.get(&name(model)) else {
        return (None, None);
    };
    let nums = |v: Vec<Version>| v.into_iter().map(Version::get).collect::<Vec<_>>();
    (
        m.available.as_ref().map(|a| nums(a.numbers())),
        m.aspired.as_ref().map(|a| nums(a.versions.clone())),
    )
}

async fn available(registry: &dyn Registry, model: &str) -> AvailableVersions {
    let state = registry.state().await.unwrap();
    state.models[&name(model)].available.clone().unwrap()
}

async fn polls(poller: &mut StoragePoller, registry: &dyn Registry, n: usize) {
    for _ in 0..n {
        poller.poll_once(registry).await;
    }
}

fn both(v: &[u64]) -> (Option<Vec<u64>>, Option<Vec<u64>>) {
    (Some(v.to_vec()), Some(v.to_vec()))
}

#[tokio::test]
async fn version_is_published_only_after_two_identical_polls() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "1/model.pt", b"weights");
    let registry = MemoryRegistry::default();
    let mut poller = StoragePoller::new(vec![config("m", tmp.path(), VersionPolicy::Latest(1))]);
    poller.poll_once(&registry).await;
    assert_eq!(published(&registry, "m").await, (None, None));
    poller.poll_once(&registry).await;
    assert_eq!(published(&registry, "m").await, both(&[1]));
    let entry = &available(&registry, "m").await.versions[0];
    let expected = url::Url::from_file_path(tmp.path().join("1")).unwrap();
    assert_eq!(entry.path, expected.as_str());
    assert_eq!(
        entry.signatures,
        aspire_core::SignatureMap::default_for_untyped_model()
    );
    assert_eq!(poller.problem(&name("m")), None);
}

#[tokio::test]
async fn directory_being_written_is_published_once_it_stops_changing() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "1/model.pt", b"v1");
    let registry = MemoryRegistry::default();
    let mut poller = StoragePoller::new(vec![config("m", tmp.path(), VersionPolicy::Latest(1))]);
    polls(&mut poller, &registry, 2).await;
    assert_eq!(published(&registry, "m").await, both(&[1]));

    write(tmp.path(), "2/model.pt", b"partial");
    poller.poll_once(&registry).await;
    write(
        tmp.path(),
        "2/extra/vocab.txt",
        b"a file added between polls",
    );
    poller.poll_once(&registry).await;
    write(tmp.path(), "2/model.pt", b"partial, now longer");
    poller.poll_once(&registry).await;
    assert_eq!(
        published(&registry, "m").await,
        both(&[1]),
        "version 2 is still changing"
    );
    poller.poll_once(&registry).await;
    assert_eq!(
        published(&registry, "m").await,
        (Some(vec![1, 2]), Some(vec![2]))
    );
}

#[tokio::test]
async fn directory_without_model_pt_is_not_published() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "1/weights.bin", b"not a model.pt");
    write(
        tmp.path(),
        "2/nested/model.pt",
        b"not at the top of the version",
    );
    let registry = MemoryRegistry::default();
    let mut poller = StoragePoller::new(vec![config("m", tmp.path(), VersionPolicy::All)]);
    polls(&mut poller, &registry, 3).await;
    assert_eq!(published(&registry, "m").await, (None, None));
    assert!(
        poller
            .problem(&name("m"))
            .unwrap()
            .contains("no complete version")
    );

    write(tmp.path(), "1/model.pt", b"weights");
    polls(&mut poller, &registry, 2).await;
    assert_eq!(published(&registry, "m").await, both(&[1]));
    assert_eq!(poller.problem(&name("m")), None);
}

#[tokio::test]
async fn non_version_names_are_ignored_and_remembered() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in ["tmp", "01a", "0", "-1"] {
        write(
            tmp.path(),
            &format!("{dir}/model.pt"),
            b"looks like a version, is not",
        );
    }
    write(tmp.path(), "README", b"a file, not a directory");
    write(tmp.path(), "3/model.pt", b"v3");
    write(tmp.path(), "007/model.pt", b"v7");
    let registry = MemoryRegistry::default();
    let mut poller = StoragePoller::new(vec![config("m", tmp.path(), VersionPolicy::All)]);
    polls(&mut poller, &registry, 2).await;
    assert_eq!(published(&registry, "m").await, both(&[3, 7]));
    // A leading zero still names a version; its path keeps the directory's real name.
    assert!(
        available(&registry, "m").await.versions[1]
            .path
            .ends_with("/007")
    );
    let ignored: Vec<&str> = poller
        .ignored(&name("m"))
        .unwrap()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(ignored, ["-1", "0", "01a", "README", "tmp"]);

    // Names that leave are forgotten, so a later `tmp` is reported again.
    std::fs::remove_dir_all(tmp.path().join("tmp")).unwrap();
    poller.poll_once(&registry).await;
    assert!(!poller.ignored(&name("m")).unwrap().contains("tmp"));
    assert_eq!(poller.ignored(&name("other")), None);
}

#[tokio::test]
async fn version_policy_selects_the_aspired_versions() {
    let tmp = tempfile::tempdir().unwrap();
    for v in 1..=3 {
        write(tmp.path(), &format!("{v}/model.pt"), b"w");
    }
    let specific = VersionPolicy::Specific(vec![
        Version::new(1).unwrap(),
        Version::new(3).unwrap(),
        Version::new(5).unwrap(),
    ]);
    let registry = MemoryRegistry::default();
    let mut poller = StoragePoller::new(vec![
        config("latest1", tmp.path(), VersionPolicy::Latest(1)),
        config("latest2", tmp.path(), VersionPolicy::Latest(2)),
        config("specific", tmp.path(), specific),
        config("all", tmp.path(), VersionPolicy::All),
    ]);
    polls(&mut poller, &registry, 2).await;
    let all = Some(vec![1, 2, 3]);
    assert_eq!(
        published(&registry, "latest1").await,
        (all.clone(), Some(vec![3]))
    );
    assert_eq!(
        published(&registry, "latest2").await,
        (all.clone(), Some(vec![2, 3]))
    );
    assert_eq!(
        published(&registry, "specific").await,
        (all.clone(), Some(vec![1, 3]))
    );
    assert_eq!(published(&registry, "all").await, (all.clone(), all));
}

#[tokio::test]
async fn bad_signature_json_makes_only_that_version_unavailable() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "1/model.pt", b"w");
    write(tmp.path(), "1/signature.json", SIGNATURE.as_bytes());
    write(tmp.path(), "2/model.pt", b"w");
    write(
        tmp.path(),
        "2/signature.json",
        br#"{"signatures": {"s": {"inputs": []}}}"#,
    );
    write(tmp.path(), "3/model.pt", b"w");
    let registry = MemoryRegistry::default();
    let mut poller = StoragePoller::new(vec![config("m", tmp.path(), VersionPolicy::All)]);
    polls(&mut poller, &registry, 3).await;
    assert_eq!(published(&registry, "m").await, both(&[1, 3]));
    let avail = available(&registry, "m").await;
    assert!(
        avail.versions[0]
            .signatures
            .signatures
            .contains_key("predict_images")
    );

    // Fixing it makes version 2 available once the fixed directory is stable.
    write(tmp.path(), "2/signature.json", SIGNATURE.as_bytes());
    polls(&mut poller, &registry, 2).await;
    assert_eq!(published(&registry, "m").await, both(&[1, 2, 3]));
}

#[tokio::test]
async fn emptied_or_removed_base_path_keeps_the_last_published_values() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("mnist");
    write(&base, "1/model.pt", b"w");
    write(&base, "2/model.pt", b"w");
    let registry = MemoryRegistry::default();
    let mut poller = StoragePoller::new(vec![config("m", &base, VersionPolicy::Latest(1))]);
    polls(&mut poller, &registry, 2).await;
    let before = registry.state().await.unwrap().models[&name("m")].clone();
    assert_eq!(
        published(&registry, "m").await,
        (Some(vec![1, 2]), Some(vec![2]))
    );

    for v in ["1", "2"] {
        std::fs::remove_dir_all(base.join(v)).unwrap();
    }
    polls(&mut poller, &registry, 2).await;
    assert_eq!(registry.state().await.unwrap().models[&name("m")], before);
    assert!(poller.problem(&name("m")).is_some());

    std::fs::remove_dir_all(&base).unwrap();
    polls(&mut poller, &registry, 2).await;
    assert_eq!(registry.state().await.unwrap().models[&name("m")], before);

    write(&base, "3/model.pt", b"w");
    polls(&mut poller, &registry, 2).await;
    assert_eq!(published(&registry, "m").await, both(&[3]));
    assert_eq!(poller.problem(&name("m")), None);
}

#[tokio::test]
async fn unusable_base_path_publishes_nothing_and_says_why() {
    let registry = MemoryRegistry::default();
    let bad = ModelConfig::single("m", "ftp://host/models").unwrap();
    let mut poller = StoragePoller::new(vec![bad]);
    polls(&mut poller, &registry, 2).await;
    assert_eq!(published(&registry, "m").await, (None, None));
    assert!(poller.problem(&name("m")).unwrap().contains("ftp"));
}

#[tokio::test]
async fn set_models_removes_models_that_left_and_polls_new_ones() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "1/model.pt", b"w");
    let registry = MemoryRegistry::default();
    registry.set_pinned(&name("b"), Some("1")).await.unwrap();
    let a = config("a", tmp.path(), VersionPolicy::Latest(1));
    let b = config("b", tmp.path(), VersionPolicy::Latest(1));
    let mut poller = StoragePoller::new(vec![a.clone(), b.clone()]);
    polls(&mut poller, &registry, 2).await;
    assert_eq!(published(&registry, "b").await, both(&[1]));

    poller.set_models(vec![a.clone()]);
    poller.poll_once(&registry).await;
    assert_eq!(published(&registry, "b").await, (None, None));
    assert_eq!(published(&registry, "a").await, both(&[1]));
    assert_eq!(
        poller.models().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["a"]
    );

    // Added back: polled afresh, so published after two polls like any new model.
    poller.set_models(vec![a, b]);
    poller.poll_once(&registry).await;
    assert_eq!(published(&registry, "b").await, (None, None));
    poller.poll_once(&registry).await;
    assert_eq!(published(&registry, "b").await, both(&[1]));
}

/// Counts the writes discovery makes, passing them on to a memory registry.
#[derive(Default)]
struct CountingRegistry {
    inner: MemoryRegistry,
    available_puts: AtomicUsize,
    aspired_puts: AtomicUsize,
}

#[async_trait::async_trait]
impl Registry for CountingRegistry {
    async fn put_available(
        &self,
        m: &ModelName,
        v: &AvailableVersions,
    ) -> aspire_registry::Result<()> {
        self.available_puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_available(m, v).await
    }
    async fn put_aspired(&self, m: &ModelName, v: &AspiredVersions) -> aspire_registry::Result<()> {
        self.aspired_puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_aspired(m, v).await
    }
    async fn set_pinned(&self, m: &ModelName, pin: Option<&str>) -> aspire_registry::Result<()> {
        self.inner.set_pinned(m, pin).await
    }
    async fn remove_model(&self, m: &ModelName) -> aspire_registry::Result<()> {
        self.inner.remove_model(m).await
    }
    async fn put_worker(&self, id: &str, r: &WorkerRecord) -> aspire_registry::Result<()> {
        self.inner.put_worker(id, r).await
    }
    async fn remove_worker(&self, id: &str) -> aspire_registry::Result<()> {
        self.inner.remove_worker(id).await
    }
    async fn put_raw(&self, key: &str, value: Option<&[u8]>) -> aspire_registry::Result<()> {
        self.inner.put_raw(key, value).await
    }
    async fn state(&self) -> aspire_registry::Result<ClusterState> {
        self.inner.state().await
    }
    fn subscribe(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.inner.subscribe()
    }
    fn schema(&self) -> &KeySchema {
        self.inner.schema()
    }
}

impl CountingRegistry {
    fn puts(&self) -> (usize, usize) {
        (
            self.available_puts.load(Ordering::SeqCst),
            self.aspired_puts.load(Ordering::SeqCst),
        )
    }
}

#[tokio::test]
async fn publishes_at_start_and_then_only_changes() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "1/model.pt", b"w");
    write(tmp.path(), "2/model.pt", b"w");
    let registry = CountingRegistry::default();
    let mut poller = StoragePoller::new(vec![config("m", tmp.path(), VersionPolicy::Latest(1))]);
    polls(&mut poller, &registry, 5).await;
    assert_eq!(registry.puts(), (1, 1));

    // A policy change rewrites only `aspired`.
    poller.set_models(vec![config("m", tmp.path(), VersionPolicy::All)]);
    polls(&mut poller, &registry, 2).await;
    assert_eq!(registry.puts(), (1, 2));
    assert_eq!(published(&registry, "m").await, both(&[1, 2]));

    // A restarted discovery writes its first result even if the registry holds it already.
    let mut restarted = StoragePoller::new(vec![config("m", tmp.path(), VersionPolicy::All)]);
    polls(&mut restarted, &registry, 3).await;
    assert_eq!(registry.puts(), (2, 3));
}

fn files_under(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((
                    path.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn fetch_version_copies_nested_files_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("store");
    // Larger than one read chunk, and every byte value, so truncation or re-encoding shows.
    let weights: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    write(&base, "4/model.pt", &weights);
    write(&base, "4/signature.json", SIGNATURE.as_bytes());
    write(&base, "4/assets/deep/er/vocab.txt", b"hello\nworld\n");
    write(&base, "4/assets/empty.bin", b"");
    write(
        &base,
        "40/model.pt",
        b"a sibling whose name starts the same",
    );

    let registry = MemoryRegistry::default();
    let mut poller = StoragePoller::new(vec![config("m", &base, VersionPolicy::Latest(1))]);
    polls(&mut poller, &registry, 2).await;
    let url = available(&registry, "m")
        .await
        .get(Version::new(4).unwrap())
        .unwrap()
        .path
        .clone();

    let cache = tmp.path().join("cache/m");
    let dest = cache.join("4");
    write(&dest, "stale.txt", b"from an earlier copy");
    let roots = [std::fs::canonicalize(&base).unwrap()];
    fetch_version(&url, &dest, &roots).await.unwrap();
    assert_eq!(files_under(&dest), files_under(&base.join("4")));
    // Only the finished copy is left beside it: no staging directory.
    let siblings: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(siblings, ["4"]);

    let missing = cache.join("9");
    let err = fetch_version(
        &format!("{}/9", url.trim_end_matches("/4")),
        &missing,
        &roots,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("no files"), "{err}");
    assert!(!missing.exists());
}
