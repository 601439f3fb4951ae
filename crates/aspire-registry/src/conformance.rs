//! The conformance suite every [`Registry`] implementation must pass. Each case gets a
//! fresh registry under its own prefix from the caller's factory, so cases never see each
//! other's keys even on a shared etcd.
//!
//! Call [`run_all`] from a test of the implementation. A failed case panics with the state
//! it last saw.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aspire_core::records::{DesiredSource, VersionState, VersionStatus};
use aspire_core::{
    AspiredVersions, AvailableVersion, AvailableVersions, ClusterState, ModelName, SignatureMap,
    Version, WorkerRecord,
};

use crate::Registry;

/// How long a case waits for a write to reach the watch.
const WAIT: Duration = Duration::from_secs(10);

/// Runs every case. `make(prefix)` returns a fresh registry under `prefix`.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn Registry>>,
{
    let run = format!("/conformance-{}", std::process::id());
    models_round_trip(make(format!("{run}/models")).await).await;
    pins(make(format!("{run}/pins")).await).await;
    remove_model_keeps_pin(make(format!("{run}/remove")).await).await;
    workers(make(format!("{run}/workers")).await).await;
    bad_keys_are_reported(make(format!("{run}/bad")).await).await;
}

/// Waits until the watched state satisfies `pred`; panics with the last state after
/// [`WAIT`].
pub async fn wait_for(
    registry: &dyn Registry,
    what: &str,
    pred: impl Fn(&ClusterState) -> bool,
) -> Arc<ClusterState> {
    let mut rx = registry.subscribe();
    let result = tokio::time::timeout(WAIT, async {
        loop {
            let state = rx.borrow_and_update().clone();
            if pred(&state) {
                return state;
            }
            if rx.changed().await.is_err() {
                // The registry was dropped: report the last state below.
                std::future::pending::<()>().await;
            }
        }
    })
    .await;
    match result {
        Ok(state) => state,
        Err(_) => panic!(
            "timed out waiting for {what}; last state: {:#?}",
            rx.borrow()
        ),
    }
}

fn model(name: &str) -> ModelName {
    ModelName::new(name).expect("valid test model name")
}

fn ver(n: u64) -> Version {
    Version::new(n).expect("positive test version")
}

fn available(nums: &[u64]) -> AvailableVersions {
    AvailableVersions {
        versions: nums
            .iter()
            .map(|n| AvailableVersion {
                version: ver(*n),
                path: format!("file:///models/m/{n}"),
                signatures: SignatureMap::default_for_untyped_model(),
            })
            .collect(),
    }
}

async fn models_round_trip(r: Arc<dyn Registry>) {
    let m = model("mnist");
    r.put_available(&m, &available(&[1, 2]))
        .await
        .expect("put available");
    r.put_aspired(
        &m,
        &AspiredVersions {
            versions: vec![ver(2)],
        },
    )
    .await
    .expect("put aspired");
    let state = wait_for(&*r, "available and aspired of mnist", |s| {
        s.models
            .get(&m)
            .is_some_and(|ms| ms.aspired.is_some() && ms.available.is_some())
    })
    .await;
    assert_eq!(state.models[&m].available, Some(available(&[1, 2])));
    assert_eq!(state.desired(&m).versions, vec![ver(2)]);

    // state() reads afresh and agrees with the watch.
    let fresh = r.state().await.expect("state");
    assert_eq!(fresh.models, state.models);

    // An update replaces the value.
    r.put_aspired(
        &m,
        &AspiredVersions {
            versions: vec![ver(1), ver(2)],
        },
    )
    .await
    .expect("update aspired");
    wait_for(&*r, "aspired [1, 2]", |s| {
        s.desired(&m).versions == vec![ver(1), ver(2)]
    })
    .await;
}

async fn pins(r: Arc<dyn Registry>) {
    let m = model("mnist");
    r.put_available(&m, &available(&[1, 2]))
        .await
        .expect("put available");
    r.put_aspired(
        &m,
        &AspiredVersions {
            versions: vec![ver(2)],
        },
    )
    .await
    .expect("put aspired");
    r.set_pinned(&m, Some("1")).await.expect("pin");
    let s = wait_for(&*r, "pin to 1", |s| {
        s.desired(&m).source == DesiredSource::Pinned
    })
    .await;
    assert_eq!(s.desired(&m).versions, vec![ver(1)]);

    // A pin to a version that is not available is ignored as a whole, with a reason.
    r.set_pinned(&m, Some("1,7")).await.expect("pin");
    let s = wait_for(&*r, "bad pin ignored", |s| {
        s.desired(&m).pin_problem.is_some()
    })
    .await;
    let d = s.desired(&m);
    assert_eq!(d.versions, vec![ver(2)]);
    assert!(d.pin_problem.unwrap_or_default().contains('7'));

    r.set_pinned(&m, None).await.expect("unpin");
    let s = wait_for(&*r, "unpinned", |s| {
        s.models.get(&m).is_some_and(|ms| ms.pinned.is_none())
    })
    .await;
    assert_eq!(s.desired(&m).versions, vec![ver(2)]);
}

async fn remove_model_keeps_pin(r: Arc<dyn Registry>) {
    let m = model("gone");
    r.put_available(&m, &available(&[3]))
        .await
        .expect("put available");
    r.put_aspired(
        &m,
        &AspiredVersions {
            versions: vec![ver(3)],
        },
    )
    .await
    .expect("put aspired");
    r.set_pinned(&m, Some("3")).await.expect("pin");
    wait_for(&*r, "model written", |s| {
        s.models
            .get(&m)
            .is_some_and(|ms| ms.pinned.is_some() && ms.aspired.is_some())
    })
    .await;
    r.remove_model(&m).await.expect("remove");
    let s = wait_for(&*r, "model removed", |s| {
        s.models
            .get(&m)
            .is_some_and(|ms| ms.aspired.is_none() && ms.available.is_none())
    })
    .await;
    assert_eq!(s.models[&m].pinned.as_deref(), Some("3"));
    r.set_pinned(&m, None).await.expect("unpin");
    wait_for(&*r, "model gone", |s| !s.models.contains_key(&m)).await;
}

async fn workers(r: Arc<dyn Registry>) {
    let m = model("mnist");
    let mut rec = WorkerRecord {
        address: "127.0.0.1:9001".into(),
        device: "cpu".into(),
        ..Default::default()
    };
    rec.models.insert(
        m.clone(),
        [(
            ver(1),
            VersionStatus {
                state: VersionState::Loading,
                error: None,
            },
        )]
        .into(),
    );
    r.put_worker("w1", &rec).await.expect("register");
    wait_for(&*r, "w1 registered", |s| s.workers.contains_key("w1")).await;

    rec.models.get_mut(&m).expect("model").insert(
        ver(1),
        VersionStatus {
            state: VersionState::Available,
            error: None,
        },
    );
    r.put_worker("w1", &rec).await.expect("update");
    let s = wait_for(&*r, "w1 has v1 available", |s| {
        s.workers
            .get("w1")
            .is_some_and(|w| w.available_versions(&m) == vec![ver(1)])
    })
    .await;
    assert_eq!(s.workers["w1"], rec);

    r.remove_worker("w1").await.expect("deregister");
    wait_for(&*r, "w1 deregistered", |s| !s.workers.contains_key("w1")).await;
}

async fn bad_keys_are_reported(r: Arc<dyn Registry>) {
    let m = model("mnist");
    let pined = format!("{}/models/mnist/pined", r.schema().prefix());
    r.put_raw(&pined, Some(b"1")).await.expect("raw put");
    let bad_json = format!("{}/models/mnist/aspired", r.schema().prefix());
    r.put_raw(&bad_json, Some(b"{not json"))
        .await
        .expect("raw put");
    let s = wait_for(&*r, "two problems", |s| s.problems.len() == 2).await;
    assert!(s.problems[&pined].contains("pinned"), "{:?}", s.problems);
    assert!(s.desired(&m).versions.is_empty());

    // A good value clears the problem.
    r.put_aspired(
        &m,
        &AspiredVersions {
            versions: vec![ver(4)],
        },
    )
    .await
    .expect("put aspired");
    let s = wait_for(&*r, "problem cleared", |s| s.problems.len() == 1).await;
    assert_eq!(s.desired(&m).versions, vec![ver(4)]);
    r.put_raw(&pined, None).await.expect("raw delete");
    wait_for(&*r, "no problems", |s| s.problems.is_empty()).await;
}
