//! The workers the router forwards to: one lazily connected channel and one in-flight
//! counter per address ([`Endpoint`]), liveness per registration ([`WorkerHandle`]), and
//! the power-of-two-choices pick among the workers that have a version.
//!
//! A worker a call just failed on is marked down at once, so the next requests skip it
//! without waiting for its lease to end. It comes back with a new registration (the
//! routing table then makes a new handle) or when a background health check on it
//! answers SERVING: that covers a blip on a worker whose record never changes, which
//! would otherwise stay skipped forever.
//!
//! A worker whose record vanished from the registry (its lease ran out while etcd was
//! frozen or cut off) is not taken for dead: the routing table keeps its handle, with its
//! last record, and [`WorkerHandle::watch_vanished`] probes its health at once and then
//! every [`VANISHED_PROBE_INTERVAL`]; the first probe that fails or answers NOT_SERVING
//! (a draining worker says so before it deregisters) drops it for good.

use std::cell::Cell;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use aspire_core::WorkerRecord;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A connection attempt that takes longer fails the call, which then retries elsewhere.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings while calls are in flight detect a worker host that vanished without
/// closing its connections (no RST ever comes).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Health checks of a down worker back off up to this interval.
const MAX_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// How often a worker whose record vanished is health-checked while it is kept.
pub(crate) const VANISHED_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// The service whose health a probe asks for, as workers report it.
const PREDICTION_SERVICE: &str = "tensorflow.serving.PredictionService";

/// One worker address: its channel (shared by every registration at that address) and
/// its requests in flight, the load measure the balancer compares.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) address: String,
    pub(crate) channel: Channel,
    in_flight: AtomicUsize,
}

impl Endpoint {
    /// A channel to `address` (`host:port`, or a URI) that connects on first use, over
    /// TLS when `tls` is given (Predict and the health probes share it).
    pub(crate) fn connect_lazy(
        address: &str,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, String> {
        let uri = aspire_tls::worker_uri(address, tls.is_some());
        let mut endpoint = tonic::transport::Endpoint::from_shared(uri)
            .map_err(|e| format!("worker address {address:?} is not a valid address: {e}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("worker address {address:?}: cannot use TLS: {e}"))?;
        }
        Ok(Self {
            address: address.to_string(),
            channel: endpoint.connect_lazy(),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Counts a call until the guard drops (also when the call is cancelled).
    pub(crate) fn start_call(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A call in flight on an [`Endpoint`].
pub(crate) struct InFlight<'a>(&'a Endpoint);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One registration of a worker: its record as read from the registry and whether a
/// call on it just failed. A new record value gets a new handle, live again.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    pub(crate) id: String,
    pub(crate) record: WorkerRecord,
    pub(crate) endpoint: Arc<Endpoint>,
    /// Set by the call that marks it down; cleared only by the probe that call started,
    /// so exactly one probe runs per down period.
    down: AtomicBool,
    /// Its record vanished and a probe found it gone: never live again (a new
    /// registration gets a new handle).
    gone: AtomicBool,
    /// The routing table no longer keeps it as vanished (it re-registered, or was
    /// dropped): its vanished-worker probe stops.
    retired: AtomicBool,
}

impl WorkerHandle {
    pub(crate) fn new(id: String, record: WorkerRecord, endpoint: Arc<Endpoint>) -> Self {
        Self {
            id,
            record,
            endpoint,
            down: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            retired: AtomicBool::new(false),
        }
    }

    /// Not marked down, nor found gone after its record vanished.
    pub(crate) fn is_live(&self) -> bool {
        !self.down.load(Ordering::Acquire) && !self.gone.load(Ordering::Acquire)
    }

    /// Its record vanished from the registry: probes its health at once and then every
    /// `interval`, until a probe fails or answers NOT_SERVING (it is then gone, and sent
    /// on `dropped` so the routing table lets it go) or it is [`Self::retire`]d.
    pub(crate) fn watch_vanished(
        self: &Arc<Self>,
        interval: Duration,
        dropped: tokio::sync::mpsc::UnboundedSender<Arc<WorkerHandle>>,
    ) {
        tracing::warn!(
            worker = %self.id, address = %self.endpoint.address,
            "worker's registration vanished; routing to it while it answers health checks"
        );
        tokio::spawn(probe_while_vanished(
            Arc::downgrade(self),
            self.endpoint.channel.clone(),
            interval,
            dropped,
        ));
    }

    /// Stops the probe [`Self::watch_vanished`] started.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Skips this worker from now on, and starts probing its health (first after
    /// `probe_after`, then backing off) until it answers SERVING or this registration ends.
    pub(crate) fn mark_down(self: &Arc<Self>, why: &str, probe_after: Duration) {
        if self.down.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::warn!(
            worker = %self.id, address = %self.endpoint.address,
            "marking worker down until it answers health checks or re-registers: {why}"
        );
        tokio::spawn(probe_until_back(
            Arc::downgrade(self),
            self.endpoint.channel.clone(),
            probe_after,
        ));
    }
}

/// Whether the worker behind `channel` answers SERVING within [`CONNECT_TIMEOUT`].
async fn is_serving(channel: &Channel) -> bool {
    let mut client = HealthClient::new(channel.clone());
    let request = HealthCheckRequest {
        service: PREDICTION_SERVICE.to_string(),
    };
    let check = tokio::time::timeout(CONNECT_TIMEOUT, client.check(request)).await;
    matches!(check, Ok(Ok(ref r)) if r.get_ref().status == ServingStatus::Serving as i32)
}

async fn probe_while_vanished(
    worker: Weak<WorkerHandle>,
    channel: Channel,
    interval: Duration,
    dropped: tokio::sync::mpsc::UnboundedSender<Arc<WorkerHandle>>,
) {
    loop {
        let serving = is_serving(&channel).await;
        let Some(handle) = worker.upgrade() else {
            return;
        };
        if handle.retired.load(Ordering::Acquire) {
            return;
        }
        if !serving {
            tracing::warn!(
                worker = %handle.id, address = %handle.endpoint.address,
                "dropping worker: its registration vanished and it no longer answers SERVING"
            );
            handle.gone.store(true, Ordering::Release);
            let _ = dropped.send(handle);
            return;
        }
        drop(handle);
        tokio::time::sleep(interval).await;
    }
}

async fn probe_until_back(worker: Weak<WorkerHandle>, channel: Channel, mut wait: Duration) {
    loop {
        tokio::time::sleep(wait).await;
        // A new record or a removed one dropped this handle: nothing to bring back.
        let Some(handle) = worker.upgrade() else {
            return;
        };
        if is_serving(&channel).await {
            tracing::info!(worker = %handle.id, address = %handle.endpoint.address, "worker answers health checks again");
            handle.down.store(false, Ordering::Release);
            return;
        }
        wait = (wait * 2).min(MAX_PROBE_INTERVAL);
    }
}

/// Power of two choices on requests in flight: two distinct live workers at random, the
/// less loaded one wins. `None` when no worker is live. Workers at the `avoid` address
/// are skipped too: a retry must not land on the worker that just failed under another
/// registration of it (a record that changed while the call was in flight).
pub(crate) fn pick<'a>(
    workers: &'a [Arc<WorkerHandle>],
    avoid: Option<&Endpoint>,
) -> Option<&'a Arc<WorkerHandle>> {
    let eligible = |w: &&Arc<WorkerHandle>| {
        w.is_live() && avoid.is_none_or(|a| !std::ptr::eq(a, Arc::as_ptr(&w.endpoint)))
    };
    let live = || workers.iter().filter(eligible);
    let n = live().count();
    if n < 2 {
        return live().next();
    }
    let r = random();
    let a = (r % n as u64) as usize;
    let mut b = ((r >> 32) % (n as u64 - 1)) as usize;
    if b >= a {
        b += 1;
    }
    // A worker marked down between the count and here shortens the list; either
    // survivor (or any live one) will do.
    match (live().nth(a), live().nth(b)) {
        (Some(x), Some(y)) => Some(if y.endpoint.load() < x.endpoint.load() {
            y
        } else {
            x
        }),
        (Some(x), None) | (None, Some(x)) => Some(x),
        (None, None) => live().next(),
    }
}

/// splitmix64 on a per-thread state: the balancer needs cheap, not strong, randomness.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(std::collections::hash_map::RandomState::new().hash_one(0u64));
    }
    STATE.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handles(loads: &[usize]) -> Vec<Arc<WorkerHandle>> {
        loads
            .iter()
            .enumerate()
            .map(|(i, load)| {
                let ep = Arc::new(
                    Endpoint::connect_lazy(&format!("127.0.0.1:{}", 1 + i), None).unwrap(),
                );
                ep.in_flight.store(*load, Ordering::Relaxed);
                Arc::new(WorkerHandle::new(
                    format!("w{i}"),
                    WorkerRecord::default(),
                    ep,
                ))
            })
            .collect()
    }

    fn counts(workers: &[Arc<WorkerHandle>], picks: usize) -> Vec<usize> {
        let mut counts = vec![0; workers.len()];
        for _ in 0..picks {
            let w = pick(workers, None).unwrap();
            counts[workers.iter().position(|x| Arc::ptr_eq(x, w)).unwrap()] += 1;
        }
        counts
    }

    #[tokio::test]
    async fn the_most_loaded_worker_is_never_picked() {
        let workers = handles(&[0, 5, 9]);
        let c = counts(&workers, 3000);
        // Pairs (0,5) and (0,9) go to the idle worker, (5,9) to the middle one.
        assert_eq!(c[2], 0, "{c:?}");
        assert!(c[0] > 1700 && c[1] > 700, "{c:?}");
    }

    #[tokio::test]
    async fn equal_loads_spread_evenly() {
        let workers = handles(&[0, 0, 0, 0]);
        let c = counts(&workers, 4000);
        assert!(c.iter().all(|n| *n > 800), "{c:?}");
    }

    #[tokio::test]
    async fn down_workers_are_skipped() {
        let workers = handles(&[0, 7]);
        assert_eq!(pick(&workers[..1], None).unwrap().id, "w0");
        assert!(pick(&workers[..1], Some(&workers[0].endpoint)).is_none());
        assert_eq!(pick(&workers, Some(&workers[0].endpoint)).unwrap().id, "w1");
        // Unreachable address: its probe never brings it back during this test.
        workers[0].mark_down("test", Duration::from_secs(3600));
        assert!(!workers[0].is_live());
        assert_eq!(counts(&workers, 100), vec![0, 100]);
        workers[1].mark_down("test", Duration::from_secs(3600));
        assert!(pick(&workers, None).is_none());
        assert!(pick(&[], None).is_none());
    }

    /// A worker's health service over mTLS (client certificates from `ca`), in process.
    async fn tls_health_server(ca: &aspire_tls::testing::TestCa) -> (String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ssl.cfg");
        let server = ca.issue(&["127.0.0.1"]);
        let text = aspire_tls::testing::ssl_config_text(&server, Some(&ca.cert_pem()), true);
        std::fs::write(&file, text).unwrap();
        let tls = aspire_tls::ServerTls::load(&file).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(PREDICTION_SERVICE, tonic_health::ServingStatus::Serving)
            .await;
        tokio::spawn(async move {
            let _reporter = reporter;
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(aspire_tls::tls_incoming(listener, tls))
                .await
        });
        (addr, dir)
    }

    fn client_tls(ca: &aspire_tls::testing::TestCa, identity: bool) -> ClientTlsConfig {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            Some(path)
        };
        let pair = ca.issue(&["router"]);
        let args = aspire_tls::WorkerTlsArgs {
            ca_file: write("ca.pem", &ca.cert_pem()),
            cert_file: identity.then(|| write("cert.pem", &pair.cert)).flatten(),
            key_file: identity.then(|| write("key.pem", &pair.key)).flatten(),
            server_name: None,
        };
        args.client_config().unwrap().unwrap()
    }

    #[tokio::test]
    async fn health_probes_bring_a_worker_back_over_mtls() {
        let ca = aspire_tls::testing::TestCa::new("cluster CA");
        let (addr, _dir) = tls_health_server(&ca).await;
        let with_cert =
            Arc::new(Endpoint::connect_lazy(&addr, Some(&client_tls(&ca, true))).unwrap());
        let worker = Arc::new(WorkerHandle::new(
            "w".into(),
            WorkerRecord::default(),
            with_cert,
        ));
        worker.mark_down("test", Duration::from_millis(10));
        let start = std::time::Instant::now();
        while !worker.is_live() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the probe over mTLS never answered"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Without a client certificate the same worker refuses the connection.
        let without = Endpoint::connect_lazy(&addr, Some(&client_tls(&ca, false))).unwrap();
        let refused = HealthClient::new(without.channel.clone())
            .check(HealthCheckRequest {
                service: PREDICTION_SERVICE.into(),
            })
            .await;
        assert!(
            refused.is_err(),
            "a router without a certificate was served: {refused:?}"
        );
        // Nor does a plaintext channel get an answer.
        let plain = Endpoint::connect_lazy(&addr, None).unwrap();
        let refused = HealthClient::new(plain.channel.clone())
            .check(HealthCheckRequest {
                service: PREDICTION_SERVICE.into(),
            })
            .await;
        assert!(
            refused.is_err(),
            "a plaintext router was served: {refused:?}"
        );
    }

    #[tokio::test]
    async fn in_flight_guard_counts_while_held() {
        let workers = handles(&[0]);
        let ep = &workers[0].endpoint;
        {
            let _a = ep.start_call();
            let _b = ep.start_call();
            assert_eq!(ep.load(), 2);
        }
        assert_eq!(ep.load(), 0);
    }
}
