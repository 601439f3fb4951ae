//! The Grafana dashboard in `deploy/grafana/aspire-dashboard.json` names only metrics that
//! Aspire exports: every `aspire_*` name in its queries is looked up among the metric
//! families of a worker's and a router's registries (each metric touched once so that it
//! shows), with `_bucket`, `_sum` and `_count` allowed on histograms.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use aspire_telemetry::metrics::{Registry, RouterMetrics, WorkerMetrics};

/// Metric family name → whether it is a histogram, for every metric Aspire exports.
fn exported() -> BTreeMap<String, bool> {
    let worker = WorkerMetrics::new();
    let version = worker.version("m", "1");
    version.requests.record(0, Duration::from_millis(1));
    version.batch.set_queue_rows(1);
    version.batch.observe_queue_wait(Duration::from_millis(1));
    version.batch.observe_batch(Duration::from_millis(1), 2, 1);
    worker.version_loaded("m", Duration::from_secs(1));
    worker.version_load_failed("m");
    worker.slow_passes("m", "1", 1, 1);
    worker.set_versions_available([("m", 1)]);
    let router = RouterMetrics::new(|| 1);
    router.route("m", 1).record(0, Duration::from_millis(1));
    router.retried();
    router.repicked();
    router.worker_marked_down();
    let mut names = BTreeMap::new();
    let mut add = |registry: &Registry| {
        for family in registry.gather() {
            let histogram = family.get_field_type() == prometheus::proto::MetricType::HISTOGRAM;
            names.insert(family.name().to_string(), histogram);
        }
    };
    add(worker.registry());
    add(router.registry());
    names
}

/// Every `aspire_*` identifier in `text`.
fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("aspire_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// The names in `names` that are not exported (histogram suffixes allowed).
fn unknown(names: &[String], exported: &BTreeMap<String, bool>) -> Vec<String> {
    names
        .iter()
        .filter(|name| {
            if exported.contains_key(name.as_str()) {
                return false;
            }
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s));
            base.is_none_or(|b| exported.get(b) != Some(&true))
        })
        .cloned()
        .collect()
}

fn dashboard() -> serde_json::Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/grafana/aspire-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_metric_the_dashboard_names_is_exported() {
    let exported = exported();
    let dash = dashboard();
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut all = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel '{title}' has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "panel '{title}': no metric in {expr}");
            let missing = unknown(&names, &exported);
            assert!(
                missing.is_empty(),
                "panel '{title}' names metrics Aspire does not export: {missing:?}; \
                 exported: {:?}",
                exported.keys().collect::<Vec<_>>()
            );
            all.extend(names);
        }
    }
    // The variables' queries too.
    let variables = dash["templating"]["list"].to_string();
    assert!(unknown(&metric_names(&variables), &exported).is_empty());
    // What the dashboard is for: request rate and errors, latency, batches, queues,
    // loads and live workers, each shown.
    for wanted in [
        "aspire_router_requests_total",
        "aspire_router_request_duration_seconds_bucket",
        "aspire_worker_batch_rows_bucket",
        "aspire_worker_queue_rows",
        "aspire_worker_version_load_duration_seconds_bucket",
        "aspire_worker_version_load_failures_total",
        "aspire_router_live_workers",
    ] {
        assert!(all.iter().any(|n| n == wanted), "no panel shows {wanted}");
    }
}

#[test]
fn the_check_catches_a_name_that_is_not_exported() {
    let exported = exported();
    let names = metric_names(
        "rate(aspire_worker_requests_total[1m]) + aspire_worker_nope \
         + aspire_router_live_workers_bucket",
    );
    assert_eq!(
        names,
        [
            "aspire_worker_requests_total",
            "aspire_worker_nope",
            "aspire_router_live_workers_bucket"
        ]
    );
    // A gauge has no buckets; a histogram does.
    assert_eq!(
        unknown(&names, &exported),
        ["aspire_worker_nope", "aspire_router_live_workers_bucket"]
    );
    assert!(unknown(&["aspire_worker_batch_rows_bucket".into()], &exported).is_empty());
}
