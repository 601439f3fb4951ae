//! Which answer a request for a version that is not served gets, forwarded by a router
//! or not.

use super::*;

fn v(n: u64) -> Version {
    Version::new(n).unwrap()
}

fn status(state: VersionState, error: Option<&str>) -> VersionStatus {
    VersionStatus {
        state,
        error: error.map(str::to_string),
    }
}

fn entry() -> ModelEntry {
    ModelEntry {
        statuses: BTreeMap::from([
            (v(1), status(VersionState::End, None)),
            (v(2), status(VersionState::Unloading, None)),
            (v(3), status(VersionState::End, Some("load failed"))),
            (v(4), status(VersionState::Loading, None)),
        ]),
        ..ModelEntry::default()
    }
}

#[test]
fn a_forwarded_request_for_a_version_not_served_gets_version_unloading() {
    let model = ModelName::new("m").unwrap();
    let e = entry();
    // Unloaded, unloading, a failed load, loading (again), never heard of: the router
    // saw each AVAILABLE here, so its view lags.
    for n in [1, 2, 3, 4, 5] {
        match e.pick_for(&model, Some(v(n)), true) {
            Err(WorkerError::VersionUnloading {
                version,
                default_version,
                ..
            }) => {
                assert_eq!(version, v(n));
                assert_eq!(default_version, None);
            }
            other => panic!("version {n}: {:?}", other.err()),
        }
        let status = tonic::Status::from(e.pick_for(&model, Some(v(n)), true).err().unwrap());
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status
                .metadata()
                .get(crate::error::UNLOADING_TRAILER)
                .unwrap(),
            &n.to_string()
        );
    }
}

#[test]
fn without_the_header_it_is_not_found() {
    let model = ModelName::new("m").unwrap();
    let e = entry();
    for n in [1, 2, 3, 4, 5] {
        let direct = e.pick_for(&model, Some(v(n)), false).err().unwrap();
        assert!(
            matches!(direct, WorkerError::VersionNotFound { .. }),
            "version {n} direct: {direct:?}"
        );
        assert_eq!(tonic::Status::from(direct).code(), tonic::Code::NotFound);
    }
    // `pick` is the direct caller's answer.
    assert!(matches!(
        e.pick(&model, Some(v(2))).err().unwrap(),
        WorkerError::VersionNotFound { .. }
    ));
}
