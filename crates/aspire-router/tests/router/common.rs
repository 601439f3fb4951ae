//! The harness: a router started in-process with [`aspire_router::run`] on a loopback
//! port over a [`MemoryRegistry`], clients, registry helpers and `eventually`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use aspire_core::records::VersionState;
use aspire_core::{
    AspiredVersions, AvailableVersion, AvailableVersions, ModelName, SignatureMap, Version,
    VersionStatus, WorkerRecord,
};
use aspire_proto::serving::prediction_service_client::PredictionServiceClient;
use aspire_proto::serving::{ModelSpec, PredictRequest, model_spec::VersionChoice};
use aspire_registry::{MemoryRegistry, Registry};
use aspire_router::RouterConfig;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Status;
use tonic::transport::Channel;

use crate::fake_worker::FakeWorker;

pub use VersionState::{Available, End, Loading, Start, Unloading};

static SYNC: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A router over an in-memory registry.
pub struct Cluster {
    pub registry: Arc<MemoryRegistry>,
    pub addr: std::net::SocketAddr,
    /// Where `/metrics` is served, for a router started [`Cluster::with_metrics`].
    pub metrics_addr: Option<std::net::SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Cluster {
    /// A router whose down workers are probed only after a minute: in these tests only
    /// the registry brings them back.
    pub async fn start() -> Self {
        Self::with_probe(Duration::from_secs(60)).await
    }

    /// A router that probes down workers after `probe`.
    pub async fn with_probe(probe: Duration) -> Self {
        Self::start_with(probe, false).await
    }

    /// [`Cluster::start`], serving `/metrics` on a loopback port of its own.
    pub async fn with_metrics() -> Self {
        Self::start_with(Duration::from_secs(60), true).await
    }

    async fn start_with(probe: Duration, metrics: bool) -> Self {
        Self::start_with_args(probe, metrics, &[]).await
    }

    /// A router with `extra_args` on its command line.
    pub async fn start_with_args(probe: Duration, metrics: bool, extra_args: &[&str]) -> Self {
        let metrics_listener = match metrics {
            true => Some(TcpListener::bind("127.0.0.1:0").await.unwrap()),
            false => None,
        };
        let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr().unwrap());
        let registry = Arc::new(MemoryRegistry::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let port = addr.port().to_string();
        let probe_ms = probe.as_millis().to_string();
        let mut args = vec![
            "aspire-router",
            "--host=127.0.0.1",
            "--port",
            &port,
            "--worker-probe-interval-ms",
            &probe_ms,
            "--metrics-port=0",
        ];
        args.extend_from_slice(extra_args);
        let config = RouterConfig::try_parse_from(args).expect("router flags");
        let (stop, stopped) = oneshot::channel::<()>();
        let dyn_registry: Arc<dyn Registry> = registry.clone();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            aspire_router::run_with_metrics(
                config,
                dyn_registry,
                listener,
                metrics_listener,
                shutdown,
            )
            .await
            .unwrap();
        });
        Self {
            registry,
            addr,
            metrics_addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts the router's graceful shutdown; resolves when `run` has returned.
    /// A router with model `m` (v1 available and aspired) on two fake workers, "a" and
    /// "b", both with v1 AVAILABLE; returns once the router serves v1 by default.
    pub async fn two_workers_serving_m_v1() -> (Self, FakeWorker, FakeWorker) {
        let cluster = Self::start().await;
        let (a, b) = (FakeWorker::start("a").await, FakeWorker::start("b").await);
        cluster.model("m", &[1], &[1]).await;
        cluster.register(&a, &[(1, VersionState::Available)]).await;
        cluster.register(&b, &[(1, VersionState::Available)]).await;
        eventually_default_version(&mut cluster.client(), "m", 1).await;
        (cluster, a, b)
    }

    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        let _ = self.stop.take().expect("already shut down").send(());
        self.task.take().unwrap()
    }

    pub fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_lazy()
    }

    pub fn client(&self) -> PredictionServiceClient<Channel> {
        PredictionServiceClient::new(self.channel())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// Writes `model`'s `available` (default signatures) and `aspired` keys.
    pub async fn model(&self, model: &str, available: &[u64], aspired: &[u64]) {
        let sigs = available
            .iter()
            .map(|n| (*n, SignatureMap::default_for_untyped_model()))
            .collect::<Vec<_>>();
        self.model_with_signatures(model, &sigs, aspired).await;
    }

    pub async fn model_with_signatures(
        &self,
        model: &str,
        available: &[(u64, SignatureMap)],
        aspired: &[u64],
    ) {
        let name = ModelName::new(model).unwrap();
        let versions = available
            .iter()
            .map(|(n, signatures)| AvailableVersion {
                version: v(*n),
                path: format!("file:///models/{model}/{n}"),
                signatures: signatures.clone(),
            })
            .collect();
        self.registry
            .put_available(&name, &AvailableVersions { versions })
            .await
            .unwrap();
        let aspired = AspiredVersions {
            versions: aspired.iter().map(|n| v(*n)).collect(),
        };
        self.registry.put_aspired(&name, &aspired).await.unwrap();
    }

    /// Returns once the router's table reflects every registry write made before the call:
    /// it writes a new marker model and waits until the router knows it (tables are built
    /// from whole states, in order).
    pub async fn sync(&self) {
        let n = SYNC.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("sync-{n}");
        let model = ModelName::new(&name).unwrap();
        let aspired = AspiredVersions {
            versions: vec![v(1)],
        };
        self.registry.put_aspired(&model, &aspired).await.unwrap();
        let client = self.client();
        eventually("the router sees the marker model", || {
            let (mut client, name) = (client.clone(), name.clone());
            async move {
                match predict(&mut client, &name, None).await {
                    Err(e) if e.code() == tonic::Code::Unavailable => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            }
        })
        .await;
    }

    pub async fn pin(&self, model: &str, pin: Option<&str>) {
        let name = ModelName::new(model).unwrap();
        self.registry.set_pinned(&name, pin).await.unwrap();
    }

    /// Registers `worker` as having these versions of model "m".
    pub async fn register(&self, worker: &FakeWorker, versions: &[(u64, VersionState)]) {
        let rec = record(&worker.addr.to_string(), "m", versions);
        self.registry
            .put_worker(&worker.state.id, &rec)
            .await
            .unwrap();
    }
}

pub fn v(n: u64) -> Version {
    Version::new(n).unwrap()
}

pub fn record(address: &str, model: &str, versions: &[(u64, VersionState)]) -> WorkerRecord {
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
        address: address.to_string(),
        device: "cpu".into(),
        models: BTreeMap::from([(ModelName::new(model).unwrap(), statuses)]),
        ..Default::default()
    }
}

pub fn spec(model: &str, version: Option<i64>) -> ModelSpec {
    ModelSpec {
        name: model.into(),
        version_choice: version.map(VersionChoice::Version),
        signature_name: String::new(),
    }
}

/// Sends a Predict; answers which worker served it and which version it was sent.
pub async fn predict(
    client: &mut PredictionServiceClient<Channel>,
    model: &str,
    version: Option<i64>,
) -> Result<(String, i64), Status> {
    let request = PredictRequest {
        model_spec: Some(spec(model, version)),
        ..Default::default()
    };
    let response = client.predict(request).await?.into_inner();
    let worker = String::from_utf8(response.outputs["worker"].string_val[0].clone()).unwrap();
    Ok((worker, response.outputs["version"].int64_val[0]))
}

/// Retries `check` until it succeeds, for up to 20 s; panics with its last complaint.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match check().await {
            Ok(value) => return value,
            Err(why) if tokio::time::Instant::now() > deadline => {
                panic!("{what}: still not true after 20 s: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Waits until a default Predict for `model` is answered with `version`.
pub async fn eventually_default_version(
    client: &mut PredictionServiceClient<Channel>,
    model: &str,
    version: i64,
) {
    eventually(&format!("default version of {model} is {version}"), || {
        let mut client = client.clone();
        async move {
            match predict(&mut client, model, None).await {
                Ok((_, got)) if got == version => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await
}
