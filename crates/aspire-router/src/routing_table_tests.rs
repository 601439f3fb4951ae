//! Unit tests of [`super`]: the version rules and what survives a rebuild.

use std::collections::BTreeMap;
use std::time::Duration;

use aspire_core::keys::KeySchema;
use aspire_core::{VersionStatus, WorkerRecord};

use super::*;

fn v(n: u64) -> Version {
    Version::new(n).unwrap()
}

fn record(port: u16, versions: &[(u64, VersionState)]) -> WorkerRecord {
    let statuses = versions
        .iter()
        .map(|(n, state)| {
            let status = VersionStatus {
                state: *state,
                error: None,
            };
            (v(*n), status)
        })
        .collect();
    WorkerRecord {
        address: format!("127.0.0.1:{port}"),
        device: "cpu".into(),
        models: BTreeMap::from([(ModelName::new("m").unwrap(), statuses)]),
        ..Default::default()
    }
}

struct Cluster {
    schema: KeySchema,
    state: ClusterState,
}

impl Cluster {
    fn new(aspired: &[u64]) -> Self {
        let mut c = Self {
            schema: KeySchema::default(),
            state: ClusterState::default(),
        };
        let json = format!(r#"{{"versions":{aspired:?}}}"#);
        c.put("/aspire/models/m/aspired", json.as_bytes());
        c
    }

    fn put(&mut self, key: &str, value: &[u8]) {
        self.state.apply(&self.schema, key, Some(value));
    }

    fn worker(&mut self, id: &str, rec: &WorkerRecord) {
        let key = format!("/aspire/workers/{id}");
        self.put(&key, &serde_json::to_vec(rec).unwrap());
    }

    fn table(&self, builder: &mut TableBuilder) -> RoutingTable {
        builder.build(Arc::new(self.state.clone()))
    }
}

use VersionState::{Available, Loading};

/// A builder whose found-gone receiver is dropped (tests that need it use `new`).
fn builder() -> TableBuilder {
    TableBuilder::new(None, Duration::from_secs(1)).0
}

#[tokio::test]
async fn default_version_prefers_desired_then_highest_available() {
    let mut c = Cluster::new(&[3]);
    c.worker(
        "a",
        &record(1, &[(1, Available), (2, Available), (3, Loading)]),
    );
    let mut b = builder();
    let t = c.table(&mut b);
    // Version 3 is desired but only loading: serve the highest AVAILABLE meanwhile.
    assert_eq!(t.route("m", None).unwrap().0, v(2));
    c.worker(
        "a",
        &record(1, &[(1, Available), (2, Available), (3, Available)]),
    );
    assert_eq!(c.table(&mut b).route("m", None).unwrap().0, v(3));
    // A desired version below the highest AVAILABLE one wins (a rollback).
    let mut c = Cluster::new(&[1]);
    c.worker("a", &record(1, &[(1, Available), (2, Available)]));
    assert_eq!(c.table(&mut b).route("m", None).unwrap().0, v(1));
}

#[tokio::test]
async fn explicit_versions_and_not_found_sentences() {
    let mut c = Cluster::new(&[2]);
    c.worker(
        "a",
        &record(1, &[(1, Available), (2, Available), (3, Loading)]),
    );
    let t = c.table(&mut builder());
    assert_eq!(t.route("m", Some(v(1))).unwrap().0, v(1));
    let err = t.route("m", Some(v(3))).unwrap_err().to_string();
    assert_eq!(
        err,
        "version 3 is not AVAILABLE on any worker; available versions of model 'm': 1, 2"
    );
    let err = t.route("x", None).unwrap_err().to_string();
    assert_eq!(err, "model 'x' is not served; models served: m");
}

#[tokio::test]
async fn known_model_without_live_workers_is_unavailable() {
    let mut c = Cluster::new(&[1]);
    let mut b = builder();
    let err = c.table(&mut b).route("m", None).unwrap_err();
    assert!(matches!(err, RouterError::NoLiveWorker(_)), "{err}");
    assert!(
        err.to_string()
            .contains("no worker has model 'm' AVAILABLE yet")
    );
    c.worker("a", &record(1, &[(1, Available)]));
    let t = c.table(&mut b);
    t.workers[0].mark_down("test", Duration::from_secs(3600));
    let err = t.route("m", Some(v(1))).unwrap_err();
    assert!(matches!(err, RouterError::NoLiveWorker(_)), "{err}");
    assert!(err.to_string().contains("failed just now (a)"), "{err}");
    assert!(t.route_exact("m", v(1), &t.workers[0]).is_none());
}

#[tokio::test]
async fn unchanged_records_keep_their_handle_and_down_mark() {
    let mut c = Cluster::new(&[1]);
    c.worker("a", &record(1, &[(1, Available)]));
    c.worker("b", &record(2, &[(1, Available)]));
    let mut builder = builder();
    let t1 = c.table(&mut builder);
    t1.workers[0].mark_down("test", Duration::from_secs(3600));
    // Another key changes: "a" keeps its handle, still down.
    c.put("/aspire/models/m/pinned", b"1");
    let t2 = c.table(&mut builder);
    assert!(Arc::ptr_eq(&t1.workers[0], &t2.workers[0]));
    assert_eq!(t2.route("m", None).unwrap().1.id, "b");
    // A new record value for "a" is a new registration: live again, same channel.
    c.worker("a", &record(1, &[(1, Available), (2, Loading)]));
    let t3 = c.table(&mut builder);
    assert!(!Arc::ptr_eq(&t1.workers[0], &t3.workers[0]));
    assert!(t3.workers[0].is_live());
    assert!(Arc::ptr_eq(
        &t1.workers[0].endpoint,
        &t3.workers[0].endpoint
    ));
}

#[tokio::test]
async fn workers_at_one_address_share_an_endpoint_and_bad_addresses_are_ignored() {
    let mut c = Cluster::new(&[1]);
    c.worker("a", &record(7, &[(1, Available)]));
    c.worker("b", &record(7, &[(1, Available)]));
    let mut bad = record(8, &[(1, Available)]);
    bad.address = "not an address".into();
    c.worker("c", &bad);
    let t = c.table(&mut builder());
    assert_eq!(t.workers.len(), 2);
    assert!(Arc::ptr_eq(&t.workers[0].endpoint, &t.workers[1].endpoint));
}

#[test]
fn requested_versions() {
    let spec = |choice| ModelSpec {
        name: "m".into(),
        version_choice: choice,
        signature_name: String::new(),
    };
    assert_eq!(requested_version(&spec(None)).unwrap(), None);
    assert_eq!(
        requested_version(&spec(Some(VersionChoice::Version(4)))).unwrap(),
        Some(v(4))
    );
    let zero = requested_version(&spec(Some(VersionChoice::Version(0)))).unwrap_err();
    assert!(zero.to_string().contains("positive"));
    let label = spec(Some(VersionChoice::VersionLabel("stable".into())));
    let err = requested_version(&label).unwrap_err();
    assert!(matches!(err, RouterError::InvalidArgument(_)));
    assert!(
        err.to_string()
            .contains("version_label 'stable' is not supported")
    );
}

#[tokio::test]
async fn a_retry_avoids_the_failed_address_even_under_a_new_registration() {
    let mut c = Cluster::new(&[1]);
    c.worker("a", &record(1, &[(1, Available)]));
    let mut builder = builder();
    let failed = Arc::clone(&c.table(&mut builder).workers[0]);
    // While the call on "a" was in flight, "a" re-registered (new record, new handle).
    c.worker("a", &record(1, &[(1, Available), (2, Loading)]));
    let t = c.table(&mut builder);
    assert!(t.workers[0].is_live());
    assert!(t.route_exact("m", v(1), &failed).is_none());
    c.worker("b", &record(2, &[(1, Available)]));
    let t = c.table(&mut builder);
    for _ in 0..50 {
        assert_eq!(t.route_exact("m", v(1), &failed).unwrap().id, "b");
    }
}

#[tokio::test]
async fn a_vanished_record_is_kept_until_its_probe_fails_and_a_new_one_is_fresh() {
    let mut c = Cluster::new(&[1]);
    // Nothing listens on port 1: the first probe fails at once.
    c.worker("a", &record(1, &[(1, Available)]));
    c.worker("b", &record(2, &[(1, Available)]));
    let (mut builder, mut dropped) = TableBuilder::new(None, Duration::from_secs(1));
    let t = c.table(&mut builder);
    let a = Arc::clone(&t.workers[0]);
    assert_eq!(a.id, "a");
    c.state.workers.remove("a");
    let t = c.table(&mut builder);
    // Kept, with its last record, until its probe answers.
    assert_eq!(t.workers.len(), 2);
    assert!(Arc::ptr_eq(&t.workers[0], &a));
    let gone = tokio::time::timeout(Duration::from_secs(10), dropped.recv())
        .await
        .expect("the probe of a worker that does not answer reports it")
        .unwrap();
    assert!(Arc::ptr_eq(&gone, &a));
    assert!(
        !a.is_live(),
        "found gone: skipped even by tables built before"
    );
    for _ in 0..20 {
        assert_eq!(t.route("m", Some(v(1))).unwrap().1.id, "b");
    }
    builder.forget(&gone);
    let t = c.table(&mut builder);
    assert_eq!(t.workers.len(), 1);
    assert_eq!(t.workers[0].id, "b");
    // It registers again, same record: a fresh handle, live.
    c.worker("a", &record(1, &[(1, Available)]));
    let t = c.table(&mut builder);
    assert!(t.workers[0].is_live());
    assert!(!Arc::ptr_eq(&t.workers[0], &a));
}

#[tokio::test]
async fn a_worker_registering_again_while_kept_gets_a_fresh_handle() {
    let mut c = Cluster::new(&[1]);
    c.worker("a", &record(1, &[(1, Available)]));
    let (mut builder, _dropped) = TableBuilder::new(None, Duration::from_secs(3600));
    let old = Arc::clone(&c.table(&mut builder).workers[0]);
    c.state.workers.remove("a");
    c.table(&mut builder);
    c.worker("a", &record(1, &[(1, Available)]));
    let t = c.table(&mut builder);
    assert_eq!(t.workers.len(), 1);
    assert!(!Arc::ptr_eq(&t.workers[0], &old));
    // The old handle's report, arriving late, does not remove the new registration.
    builder.forget(&old);
    assert_eq!(c.table(&mut builder).workers.len(), 1);
}

#[tokio::test]
async fn route_elsewhere_prefers_the_default_version_on_another_worker() {
    let mut c = Cluster::new(&[2]);
    c.worker("a", &record(1, &[(1, Available), (2, Available)]));
    c.worker("b", &record(2, &[(1, Available)]));
    let mut b = builder();
    let t = c.table(&mut b);
    let a = Arc::clone(&t.workers[0]);
    // Only "b" is elsewhere, and it has version 1 alone.
    let (version, w) = t.route_elsewhere("m", &a).unwrap();
    assert_eq!((version, w.id.as_str()), (v(1), "b"));
    c.worker("b", &record(2, &[(1, Available), (2, Available)]));
    let t = c.table(&mut b);
    let (version, w) = t.route_elsewhere("m", &a).unwrap();
    assert_eq!((version, w.id.as_str()), (v(2), "b"));
    // Nowhere else: UNAVAILABLE, not a route back to the same worker.
    c.state.workers.remove("b");
    let mut fresh = builder();
    let t = c.table(&mut fresh);
    let err = t.route_elsewhere("m", &t.workers[0]).unwrap_err();
    assert!(matches!(err, RouterError::NoLiveWorker(_)), "{err}");
}
