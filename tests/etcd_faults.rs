//! etcd's faults under real processes: `aspire-discovery`, `aspire-worker` and
//! `aspire-router` against a three-member etcd cluster whose first listed member is cut
//! off from the other two (it keeps answering, without a leader), and against an etcd
//! holding more than a gRPC message's worth of values under the prefix. Steady clients
//! run through the router and must see no failure. Times are printed (`--nocapture`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aspire_proto::serving::prediction_service_client::PredictionServiceClient;
use aspire_registry::etcd_cluster::EtcdCluster;
use aspire_registry::etcd_server::EtcdServer;
use aspire_registry::{EtcdOptions, EtcdRegistry, Registry};
use aspire_tests::stack::{LIMIT, default_version, steady_clients, wait_default};
use aspire_tests::{Process, channel, copy_dir, export, free_port};

const PREFIX: &str = "/faults";

/// Discovery, one worker and the router, all with `--etcd-endpoints=endpoints`,
/// watching `monitored`.
struct Services {
    discovery: Process,
    worker: Process,
    router: Process,
    router_addr: String,
}

impl Services {
    fn start(endpoints: &str, monitored: &Path) -> Services {
        let etcd = [
            format!("--etcd-endpoints={endpoints}"),
            format!("--prefix={PREFIX}"),
        ];
        let discovery = Process::start(
            "aspire-discovery",
            &[
                &etcd[..],
                &[
                    "--model_name=mnist".into(),
                    format!("--model_base_path={}", monitored.display()),
                ],
            ]
            .concat(),
        );
        let worker_port = free_port();
        let mut worker = Process::start(
            "aspire-worker",
            &[
                &etcd[..],
                &[
                    "--host=127.0.0.1".into(),
                    format!("--port={worker_port}"),
                    "--worker-id=w1".into(),
                    format!("--storage-root={}", monitored.display()),
                    "--lease-ttl=5".into(),
                    "--metrics-port=0".into(),
                ],
            ]
            .concat(),
        );
        worker.wait_listening(&format!("127.0.0.1:{worker_port}"));
        let router_port = free_port();
        let router_addr = format!("127.0.0.1:{router_port}");
        let mut router = Process::start(
            "aspire-router",
            &[
                &etcd[..],
                &[
                    "--host=127.0.0.1".into(),
                    format!("--port={router_port}"),
                    "--metrics-port=0".into(),
                ],
            ]
            .concat(),
        );
        router.wait_listening(&router_addr);
        Services {
            discovery,
            worker,
            router,
            router_addr,
        }
    }

    fn logs(&self) -> String {
        format!(
            "discovery:\n{}\nworker:\n{}\nrouter:\n{}",
            self.discovery.log(),
            self.worker.log(),
            self.router.log()
        )
    }
}

/// Exports mnist v1 and v2 (briefly trained) into `tmp/exported`; returns that path.
fn export_versions(tmp: &Path) -> std::path::PathBuf {
    let exported = tmp.join("exported");
    export(&exported, 100, 1);
    export(&exported, 100, 2);
    exported
}

/// `etcdctl put` through one member; false when it refused (no leader yet).
fn try_put(endpoint: &str, key: &str, value: &str) -> bool {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(["--command-timeout=2s", "put", key, value])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The brief's case: every service lists the member about to be cut off first. Once it
/// is, a pin written through a healthy member is loaded by the worker and served by the
/// router by default, with no failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_leave_an_etcd_member_cut_off_from_its_quorum() {
    let cluster = EtcdCluster::start().unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().expect("tmp");
    let exported = export_versions(tmp.path());
    let monitored = tmp.path().join("monitored");
    for v in ["1", "2"] {
        copy_dir(&exported.join(v), &monitored.join(v));
    }
    // Member 0 (to be cut) first.
    let endpoints = cluster.endpoints().join(",");
    let services = Services::start(&endpoints, &monitored);
    // The latest version is served by default.
    wait_default(&services.router_addr, 2, Instant::now()).await;
    let steady = steady_clients(&services.router_addr, 2).await;
    let warm = Instant::now();
    while steady.answers_after(warm) < 20 {
        assert!(warm.elapsed() < LIMIT, "no steady answers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let cut = Instant::now();
    cluster.isolate(0);
    // Through a healthy member, once it has a leader (member 0 may have led).
    let key = format!("{PREFIX}/models/mnist/pinned");
    while !try_put(&cluster.endpoint(2), &key, "1") {
        assert!(
            cut.elapsed() < LIMIT,
            "the healthy members never took the pin"
        );
    }
    let pinned_at = cut.elapsed();

    let mut c = PredictionServiceClient::new(channel(&services.router_addr).await);
    let names = ["discovery", "worker", "router"];
    let mut left: [Option<Duration>; 3] = [None; 3];
    let mut served = None;
    let bound = Duration::from_secs(30);
    while served.is_none() || left.iter().any(Option::is_none) {
        let logs = [
            services.discovery.log(),
            services.worker.log(),
            services.router.log(),
        ];
        for (i, log) in logs.iter().enumerate() {
            if left[i].is_none() && log.contains("leaving etcd endpoint") {
                left[i] = Some(cut.elapsed());
            }
        }
        if served.is_none() && default_version(&mut c).await == Some(1) {
            served = Some(cut.elapsed());
        }
        assert!(
            cut.elapsed() < bound,
            "within {bound:?} of the cut: left {left:?} ({names:?}), v1 served by default \
             {served:?}\n{}",
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Keep serving a little after the switch: still no failure.
    let after = Instant::now();
    while steady.answers_after(after) < 20 {
        assert!(
            after.elapsed() < LIMIT,
            "steady clients stopped getting answers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = steady.stop().await;
    let served = served.expect("served");
    println!(
        "cut member 0: pin written {} ms after the cut; left the member after: discovery {} \
         ms, worker {} ms, router {} ms; router served the pinned v1 by default {} ms after \
         the cut; steady clients: {} answers, {} failures",
        pinned_at.as_millis(),
        left[0].unwrap_or_default().as_millis(),
        left[1].unwrap_or_default().as_millis(),
        left[2].unwrap_or_default().as_millis(),
        served.as_millis(),
        seen.ok,
        seen.failures.len()
    );
    assert!(
        seen.failures.is_empty(),
        "failed requests: {:?}",
        &seen.failures[..seen.failures.len().min(10)]
    );
    assert!(
        served < Duration::from_secs(20),
        "v1 served by default only {served:?} after the cut"
    );
}

/// More than 4 MiB of values under the prefix (five ~1 MiB values under keys the roles
/// ignore): the services start and serve, and after an etcd restart they list it again
/// and pick up a new version; steady clients see no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_work_with_more_than_4_mib_under_the_prefix() {
    let mut etcd = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
    let tmp = tempfile::tempdir().expect("tmp");
    let exported = export_versions(tmp.path());
    let monitored = tmp.path().join("monitored");
    copy_dir(&exported.join("1"), &monitored.join("1"));
    {
        let loader = EtcdRegistry::connect(
            &[etcd.endpoint()],
            aspire_core::keys::KeySchema::new(PREFIX),
            EtcdOptions::default(),
        )
        .await
        .expect("connect");
        let blob = vec![b'x'; 1024 * 1024];
        for i in 0..5 {
            loader
                .put_raw(&format!("{PREFIX}/blobs/b{i}"), Some(&blob))
                .await
                .expect("put 1 MiB");
        }
    }
    let started = Instant::now();
    let services = Services::start(&etcd.endpoint(), &monitored);
    let up = wait_default(&services.router_addr, 1, started).await;
    let steady = steady_clients(&services.router_addr, 2).await;

    etcd.restart().expect("restart etcd");
    let restarted = Instant::now();
    copy_dir(&exported.join("2"), &monitored.join("2"));
    let v2 = wait_default(&services.router_addr, 2, restarted).await;
    let after = Instant::now();
    while steady.answers_after(after) < 20 {
        assert!(
            after.elapsed() < LIMIT,
            "steady clients stopped getting answers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = steady.stop().await;
    println!(
        "5 MiB under the prefix: v1 served {} ms after start; after an etcd restart v2 \
         served by default in {} ms; steady clients: {} answers, {} failures",
        up.as_millis(),
        v2.as_millis(),
        seen.ok,
        seen.failures.len()
    );
    assert!(
        seen.failures.is_empty(),
        "failed requests: {:?}\n{}",
        &seen.failures[..seen.failures.len().min(10)],
        services.logs()
    );
}
