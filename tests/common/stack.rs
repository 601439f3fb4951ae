//! A whole cluster on loopback for end-to-end tests: a real etcd, `aspire-discovery`,
//! workers and `aspire-router` as processes, serving the MNIST model exported by the real
//! exporter, with steady clients that count every answer and failure.
//!
//! [`StackOptions`] says what differs per test: more flags per role, and another etcd
//! endpoint list for the router or the workers (a [`aspire_registry::TcpProxy`] to delay
//! or cut their link to etcd).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aspire_mnist::client::{ClientOptions, build_request};
use aspire_proto::serving::model_spec::VersionChoice;
use aspire_proto::serving::prediction_service_client::PredictionServiceClient;
use aspire_registry::etcd_server::EtcdServer;
use clap::Parser;

use crate::{Process, channel, copy_dir, eventually, export, free_port, mnist_data};

/// How long a stack step may take before a test fails.
pub const LIMIT: Duration = Duration::from_secs(90);

/// What a [`Stack`] starts with, beyond the defaults.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// The registry prefix.
    pub prefix: String,
    /// How many workers (ids `w1`, `w2`, ...).
    pub workers: usize,
    /// Versions exported (version, training iterations); the first is copied into the
    /// watched directory at start, the others wait beside it ([`Stack::add_version`]).
    pub versions: Vec<(u32, u32)>,
    /// Extra flags of every worker (after the defaults, so they override them).
    pub worker_args: Vec<String>,
    /// Extra flags of the router.
    pub router_args: Vec<String>,
    /// Extra flags of discovery.
    pub discovery_args: Vec<String>,
    /// The router's `--etcd-endpoints`, when not etcd's own (e.g. a proxy).
    pub router_etcd: Option<String>,
    /// The workers' `--etcd-endpoints`, when not etcd's own.
    pub worker_etcd: Option<String>,
    /// The workers' `--lease-ttl` in seconds.
    pub lease_ttl_secs: u64,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            prefix: "/e2e".to_string(),
            workers: 2,
            versions: vec![(1, 100), (2, 2000)],
            worker_args: Vec::new(),
            router_args: Vec::new(),
            discovery_args: Vec::new(),
            router_etcd: None,
            worker_etcd: None,
            lease_ttl_secs: 3,
        }
    }
}

/// What steady clients saw.
#[derive(Debug, Default)]
pub struct Steady {
    /// Answers.
    pub ok: usize,
    /// Every failure, as `Code: message`.
    pub failures: Vec<String>,
    /// (when, version) of every answer, to count what was served after an event.
    pub answers: Vec<(Instant, i64)>,
}

/// Steady clients running until [`SteadyClients::stop`].
pub struct SteadyClients {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Steady>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SteadyClients {
    /// What they saw so far.
    pub fn seen(&self) -> std::sync::MutexGuard<'_, Steady> {
        self.seen.lock().expect("steady lock")
    }

    /// Answers received after `at`.
    pub fn answers_after(&self, at: Instant) -> usize {
        self.seen().answers.iter().filter(|(t, _)| *t > at).count()
    }

    /// Stops them and returns what they saw.
    pub async fn stop(self) -> Steady {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("steady client");
        }
        std::mem::take(&mut *self.seen.lock().expect("steady lock"))
    }
}

/// etcd, discovery, workers and the router, on loopback, serving mnist.
pub struct Stack {
    /// The etcd server.
    pub etcd: EtcdServer,
    /// Holds the exported and the watched model directories.
    pub tmp: tempfile::TempDir,
    /// What the stack was started with.
    pub options: StackOptions,
    /// `--etcd-endpoints` (etcd's own) and `--prefix`, for aspirectl and new processes.
    pub etcd_flags: Vec<String>,
    /// Discovery.
    pub discovery: Process,
    /// The workers, in id order (`w1` first); a killed one can be started again with
    /// [`Stack::restart_worker`].
    pub workers: Vec<Process>,
    /// Each worker's gRPC address.
    pub worker_addrs: Vec<String>,
    /// The router.
    pub router: Process,
    /// The router's gRPC address.
    pub router_addr: String,
}

impl Stack {
    /// Starts everything with the default options; returns once the router serves v1.
    pub async fn start() -> Stack {
        Self::start_with(StackOptions::default()).await
    }

    /// Starts everything as `options` say; returns once the router serves the first
    /// version.
    pub async fn start_with(options: StackOptions) -> Stack {
        let started = Instant::now();
        let etcd = EtcdServer::start().expect("etcd");
        let tmp = tempfile::tempdir().expect("tmp");
        let exported = tmp.path().join("mnist_model");
        for (version, iterations) in &options.versions {
            export(&exported, *iterations, *version);
        }
        let first = options.versions.first().expect("at least one version").0;
        copy_dir(
            &exported.join(first.to_string()),
            &tmp.path().join("monitored").join(first.to_string()),
        );
        let etcd_flags = vec![
            format!("--etcd-endpoints={}", etcd.endpoint()),
            format!("--prefix={}", options.prefix),
        ];
        let discovery = Process::start(
            "aspire-discovery",
            &[
                &etcd_flags[..],
                &[
                    "--model_name=mnist".into(),
                    format!(
                        "--model_base_path={}",
                        tmp.path().join("monitored").display()
                    ),
                ],
                &options.discovery_args[..],
            ]
            .concat(),
        );
        let router_port = free_port();
        let router_addr = format!("127.0.0.1:{router_port}");
        let router_etcd = options
            .router_etcd
            .clone()
            .unwrap_or_else(|| etcd.endpoint());
        let mut router = Process::start(
            "aspire-router",
            &[
                &[
                    format!("--etcd-endpoints={router_etcd}"),
                    format!("--prefix={}", options.prefix),
                    "--host=127.0.0.1".into(),
                    format!("--port={router_port}"),
                    "--metrics-port=0".into(),
                ][..],
                &options.router_args[..],
            ]
            .concat(),
        );
        let monitored = tmp.path().join("monitored");
        let worker_etcd = options
            .worker_etcd
            .clone()
            .unwrap_or_else(|| etcd.endpoint());
        let mut workers = Vec::new();
        let mut worker_addrs = Vec::new();
        for i in 0..options.workers {
            let addr = format!("127.0.0.1:{}", free_port());
            workers.push(spawn_worker(&options, &worker_etcd, &monitored, i, &addr));
            worker_addrs.push(addr);
        }
        router.wait_listening(&router_addr);
        crate::wait_available(&router_addr, "mnist", i64::from(first), LIMIT).await;
        println!("stack up, v{first} served, after {:?}", started.elapsed());
        Stack {
            etcd,
            tmp,
            options,
            etcd_flags,
            discovery,
            workers,
            worker_addrs,
            router,
            router_addr,
        }
    }

    /// Starts worker `i` again (after a kill), on its old address.
    pub fn restart_worker(&mut self, i: usize) {
        let endpoints = self
            .options
            .worker_etcd
            .clone()
            .unwrap_or_else(|| self.etcd.endpoint());
        let addr = self.worker_addrs[i].clone();
        self.workers[i] = spawn_worker(&self.options, &endpoints, &self.monitored(), i, &addr);
    }

    /// The directory discovery watches.
    pub fn monitored(&self) -> PathBuf {
        self.tmp.path().join("monitored")
    }

    /// The exported (not yet watched) directory of `version`.
    pub fn exported(&self, version: u32) -> PathBuf {
        self.tmp
            .path()
            .join("mnist_model")
            .join(version.to_string())
    }

    /// Copies an exported version into the watched directory.
    pub fn add_version(&self, version: u32) {
        copy_dir(
            &self.exported(version),
            &self.monitored().join(version.to_string()),
        );
    }

    /// `aspirectl status` (its stdout).
    pub fn status(&self) -> String {
        let out = Command::new(crate::bin("aspirectl"))
            .args(&self.etcd_flags)
            .arg("status")
            .output()
            .expect("aspirectl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `etcdctl` against this stack's etcd; returns its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        etcdctl(&self.etcd.endpoint(), args)
    }

    /// Puts `<prefix>/models/mnist/pinned` (`None` deletes it) with etcdctl.
    pub fn pin(&self, versions: Option<&str>) {
        let key = format!("{}/models/mnist/pinned", self.options.prefix);
        match versions {
            Some(v) => self.etcdctl(&["put", &key, v]),
            None => self.etcdctl(&["del", &key]),
        };
    }

    /// Waits until `aspirectl status` shows `mnist v{version}: AVAILABLE` on `workers`
    /// workers.
    pub async fn wait_on_workers(&self, version: u32, workers: usize) {
        let line = format!("mnist v{version}: AVAILABLE");
        eventually(
            LIMIT,
            &format!("{workers} workers with v{version} AVAILABLE"),
            || {
                let status = self.status();
                let line = line.clone();
                async move { (status.matches(&line).count() == workers).then_some(()) }
            },
        )
        .await;
    }

    /// Waits until requests that name no version are answered by `version` through the
    /// router; returns how long after `since` that was.
    pub async fn wait_default(&self, version: i64, since: Instant) -> Duration {
        wait_default(&self.router_addr, version, since).await
    }

    /// Starts `n` steady clients through the router (30 s deadline each request).
    pub async fn steady_clients(&self, n: usize) -> SteadyClients {
        steady_clients(&self.router_addr, n).await
    }
}

/// Starts worker `i` (id `w{i+1}`) on `addr` with `--etcd-endpoints=endpoints` and waits
/// until it listens.
fn spawn_worker(
    options: &StackOptions,
    endpoints: &str,
    monitored: &Path,
    i: usize,
    addr: &str,
) -> Process {
    let port = addr.rsplit(':').next().expect("port");
    let mut w = Process::start(
        "aspire-worker",
        &[
            &[
                format!("--etcd-endpoints={endpoints}"),
                format!("--prefix={}", options.prefix),
                "--host=127.0.0.1".into(),
                format!("--port={port}"),
                format!("--worker-id=w{}", i + 1),
                format!("--storage-root={}", monitored.display()),
                format!("--lease-ttl={}", options.lease_ttl_secs),
                "--metrics-port=0".into(),
                "--enable_batching".into(),
            ][..],
            &options.worker_args[..],
        ]
        .concat(),
    );
    w.wait_listening(addr);
    w
}

/// Starts `n` closed-loop MNIST clients against `addr` until stopped.
pub async fn steady_clients(addr: &str, n: usize) -> SteadyClients {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Steady::default()));
    let data = Arc::new(aspire_mnist::data::load(Path::new(&mnist_data())).expect("data"));
    let mut tasks = Vec::new();
    for k in 0..n {
        let mut c = PredictionServiceClient::new(channel(addr).await);
        let (stop, seen, data) = (stop.clone(), seen.clone(), data.clone());
        tasks.push(tokio::spawn(async move {
            let opts = ClientOptions::parse_from(["mnist-client"]);
            let mut i = k;
            while !stop.load(Ordering::Relaxed) {
                let mut req =
                    tonic::Request::new(build_request(&opts, data.test.image(i % data.test.len())));
                req.set_timeout(Duration::from_secs(30));
                let result = c.predict(req).await;
                let mut s = seen.lock().expect("lock");
                match result {
                    Ok(r) => {
                        s.ok += 1;
                        if let Some(VersionChoice::Version(v)) =
                            r.into_inner().model_spec.and_then(|m| m.version_choice)
                        {
                            s.answers.push((Instant::now(), v));
                        }
                    }
                    Err(e) => s.failures.push(format!("{:?}: {}", e.code(), e.message())),
                }
                i += n;
            }
        }));
    }
    SteadyClients { stop, seen, tasks }
}

/// Runs `etcdctl` (API v3) against `endpoint`; returns its stdout, panics on failure.
pub fn etcdctl(endpoint: &str, args: &[&str]) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .expect("run etcdctl");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The version that answers a request naming none at `c`.
pub async fn default_version(
    c: &mut PredictionServiceClient<tonic::transport::Channel>,
) -> Option<i64> {
    let req = build_request(&ClientOptions::parse_from(["mnist-client"]), &[0.0; 784]);
    match c
        .predict(req)
        .await
        .ok()?
        .into_inner()
        .model_spec?
        .version_choice?
    {
        VersionChoice::Version(v) => Some(v),
        VersionChoice::VersionLabel(_) => None,
    }
}

/// Waits until requests naming no version are answered by `version` at `addr`; returns
/// how long after `since` that was.
pub async fn wait_default(addr: &str, version: i64, since: Instant) -> Duration {
    let c = PredictionServiceClient::new(channel(addr).await);
    eventually(
        LIMIT,
        &format!("default requests answered by v{version}"),
        || {
            let mut c = c.clone();
            async move { (default_version(&mut c).await == Some(version)).then(|| since.elapsed()) }
        },
    )
    .await
}
