//! The router's metrics, `aspire_router_*`:
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `aspire_router_requests_total` | counter | model, version, code | Predict calls by the version the router chose and the gRPC code the client got |
//! | `aspire_router_request_duration_seconds` | histogram | model, version | a Predict call through the router, retry included |
//! | `aspire_router_retries_total` | counter | | calls retried on another worker after the first went away |
//! | `aspire_router_repicks_total` | counter | | calls sent again because the worker was unloading the version it was sent (the router's view lagged) |
//! | `aspire_router_workers_marked_down_total` | counter | | times a worker was marked down after a failed call |
//! | `aspire_router_live_workers` | gauge | | registered workers not marked down (read at scrape time) |
//!
//! A Predict the router could not route (malformed, unknown model or version, no live
//! worker) is counted with empty `model` and `version`, so clients cannot grow the
//! number of series.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, PullingGauge, Registry,
};

use super::{LATENCY_BUCKETS, RequestMetrics};

/// Per model name, per version number.
type Routes = HashMap<String, HashMap<i64, Arc<RequestMetrics>>>;

/// The router's metrics and the registry that holds them. Cloning shares them.
#[derive(Clone)]
pub struct RouterMetrics(Arc<Inner>);

struct Inner {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    retries: IntCounter,
    repicks: IntCounter,
    marked_down: IntCounter,
    unresolved: Arc<RequestMetrics>,
    /// Handles by route, added on a route's first request and then only read.
    routes: ArcSwap<Routes>,
}

impl RouterMetrics {
    /// A new registry holding every router metric; `live_workers` is called at each
    /// scrape for `aspire_router_live_workers`.
    pub fn new(live_workers: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "aspire_router_requests_total",
                "Predict requests by model, the version the router chose, and the gRPC code the client got (empty model and version: not routed).",
            ),
            &["model", "version", "code"],
        )
        .expect("valid counter");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "aspire_router_request_duration_seconds",
                "Time a Predict request spent in the router, retry included.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model", "version"],
        )
        .expect("valid histogram");
        let retries = IntCounter::new(
            "aspire_router_retries_total",
            "Predict calls retried on another worker because the first one went away.",
        )
        .expect("valid counter");
        let repicks = IntCounter::new(
            "aspire_router_repicks_total",
            "Predict calls sent again because the worker answered that it was unloading the version it was sent (the router's view of the registry lagged).",
        )
        .expect("valid counter");
        let marked_down = IntCounter::new(
            "aspire_router_workers_marked_down_total",
            "Times a worker was marked down after a call on it failed.",
        )
        .expect("valid counter");
        let live = PullingGauge::new(
            "aspire_router_live_workers",
            "Registered workers not marked down.",
            Box::new(move || live_workers() as f64),
        )
        .expect("valid gauge");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(retries.clone()),
            Box::new(repicks.clone()),
            Box::new(marked_down.clone()),
            Box::new(live),
        ] {
            registry.register(collector).expect("unique name");
        }
        let unresolved = Arc::new(RequestMetrics::new(&requests, &request_duration, "", ""));
        Self(Arc::new(Inner {
            registry,
            requests,
            request_duration,
            retries,
            repicks,
            marked_down,
            unresolved,
            routes: ArcSwap::default(),
        }))
    }

    /// The registry to serve.
    pub fn registry(&self) -> &Registry {
        &self.0.registry
    }

    /// The handles of requests routed to `version` of `model`: a lookup after the
    /// route's first request, which makes them.
    pub fn route(&self, model: &str, version: i64) -> Arc<RequestMetrics> {
        if let Some(found) = self
            .0
            .routes
            .load()
            .get(model)
            .and_then(|v| v.get(&version))
        {
            return Arc::clone(found);
        }
        let made = Arc::new(
            RequestMetrics::new(
                &self.0.requests,
                &self.0.request_duration,
                model,
                &version.to_string(),
            )
            .init_ok(),
        );
        // Two first requests racing may both make handles; they share the same series.
        self.0.routes.rcu(|routes| {
            let mut routes = Routes::clone(routes);
            routes
                .entry(model.to_string())
                .or_default()
                .entry(version)
                .or_insert_with(|| Arc::clone(&made));
            routes
        });
        made
    }

    /// Where requests that were not routed are counted.
    pub fn unresolved(&self) -> Arc<RequestMetrics> {
        Arc::clone(&self.0.unresolved)
    }

    /// Counts a call retried on another worker.
    pub fn retried(&self) {
        self.0.retries.inc();
    }

    /// Counts a call sent again after a worker answered that it was unloading the
    /// version (to the default version there, or to another worker).
    pub fn repicked(&self) {
        self.0.repicks.inc();
    }

    /// Counts a worker marked down.
    pub fn worker_marked_down(&self) {
        self.0.marked_down.inc();
    }
}

impl fmt::Debug for RouterMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouterMetrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::metrics::sample;
    use prometheus::{Encoder, TextEncoder};

    fn text(m: &RouterMetrics) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&m.registry().gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn routes_counts_and_the_scrape_time_gauge() {
        let live = Arc::new(AtomicUsize::new(2));
        let m = RouterMetrics::new({
            let live = Arc::clone(&live);
            move || live.load(Ordering::Relaxed)
        });
        let route = m.route("m", 1);
        assert!(Arc::ptr_eq(&route, &m.route("m", 1)), "handles are cached");
        route.record(0, Duration::from_millis(1));
        m.route("m", 1).record(14, Duration::from_millis(1));
        m.route("m", 2).record(0, Duration::from_millis(1));
        m.unresolved().record(5, Duration::from_millis(1));
        m.retried();
        m.repicked();
        m.repicked();
        m.worker_marked_down();
        live.store(1, Ordering::Relaxed);

        let t = text(&m);
        let get = |name: &str, labels: &[(&str, &str)]| sample(&t, name, labels);
        let req = |model, version, code| [("model", model), ("version", version), ("code", code)];
        assert_eq!(
            get("aspire_router_requests_total", &req("m", "1", "OK")),
            Some(1.0)
        );
        assert_eq!(
            get(
                "aspire_router_requests_total",
                &req("m", "1", "Unavailable")
            ),
            Some(1.0)
        );
        assert_eq!(
            get("aspire_router_requests_total", &req("m", "2", "OK")),
            Some(1.0)
        );
        assert_eq!(
            get("aspire_router_requests_total", &req("", "", "NotFound")),
            Some(1.0)
        );
        let m1 = [("model", "m"), ("version", "1")];
        assert_eq!(
            get("aspire_router_request_duration_seconds_count", &m1),
            Some(2.0)
        );
        assert_eq!(get("aspire_router_retries_total", &[]), Some(1.0));
        assert_eq!(get("aspire_router_repicks_total", &[]), Some(2.0));
        assert_eq!(
            get("aspire_router_workers_marked_down_total", &[]),
            Some(1.0)
        );
        assert_eq!(get("aspire_router_live_workers", &[]), Some(1.0));
    }

    /// Prints what recording one routed request costs. Run with
    /// `cargo test -p aspire-telemetry --release -- --ignored --nocapture route_cost`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn route_cost() {
        use std::time::Instant;
        const N: u32 = 1_000_000;
        let m = RouterMetrics::new(|| 0);
        for v in 1..=3 {
            m.route("mnist", v);
        }
        let started = Instant::now();
        for i in 0..N {
            m.route("mnist", 2)
                .record(0, Duration::from_micros(u64::from(i % 5000)));
        }
        let ns = started.elapsed().as_nanos() as f64 / f64::from(N);
        println!("route lookup + counter + latency histogram       {ns:>6.1} ns/op");
    }
}
