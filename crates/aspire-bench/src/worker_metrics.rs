//! The worker's own view of a run, from its Prometheus endpoint (`aspire_worker_*`, when
//! the worker serves one): scraped when the measured window opens and when it closes, the
//! difference gives the batch sizes the batcher formed and where a request's time went
//! (queue wait, forward pass, the whole call in the service).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Series summed over versions, by name (`aspire_worker_batch_rows_sum`, a bucket as
/// `aspire_worker_batch_rows_bucket{le="8"}`).
pub type Sample = BTreeMap<String, f64>;

/// Fetches `url` (`http://host:port/path`) with a plain HTTP/1.1 GET and returns the body.
pub fn fetch(url: &str, timeout: Duration) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or_else(|| format!("{url}: {host} resolves to nothing"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{url}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("{url}: {e}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("{url}: {e}"))?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .map_err(|e| format!("{url}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(format!("{url}: {status}"));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_string())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
    }
    out
}

/// The `aspire_worker_*` series of `model` in a Prometheus text exposition, summed over
/// versions. Histogram buckets keep their `le` label in the name.
pub fn parse(text: &str, model: &str) -> Sample {
    let wanted = format!("model=\"{model}\"");
    let mut sample = Sample::new();
    for line in text.lines() {
        if line.starts_with('#') || !line.starts_with("aspire_worker_") {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        if !labels.split(',').any(|l| l == wanted) {
            continue;
        }
        let key = match labels.split(',').find(|l| l.starts_with("le=")) {
            Some(le) => format!("{name}{{{le}}}"),
            None => name.to_string(),
        };
        *sample.entry(key).or_default() += value;
    }
    sample
}

/// What the worker measured over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    /// Forward passes run.
    pub batches: f64,
    /// Mean rows per forward pass, padding excluded.
    pub mean_batch_rows: Option<f64>,
    /// Forward passes by rows: (`le` bound of the bucket, passes in that bucket alone),
    /// ascending, empty buckets left out.
    pub batch_rows_histogram: Vec<(String, f64)>,
    /// Mean time of one forward pass (assembling inputs and running the model), µs.
    pub mean_forward_pass_us: Option<f64>,
    /// Mean wait of a request in the queue, µs.
    pub mean_queue_wait_us: Option<f64>,
    /// Mean time of a Predict call in the worker's service, µs.
    pub mean_request_us: Option<f64>,
    /// Predict calls the worker counted.
    pub requests: f64,
}

impl WorkerView {
    /// The difference of two samples, `None` if the worker exports no batch metrics.
    pub fn between(before: &Sample, after: &Sample) -> Option<Self> {
        let delta = |key: &str| {
            after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
        };
        if !after.contains_key("aspire_worker_batch_rows_count") {
            return None;
        }
        let mean = |sum: &str, count: &str, scale: f64| {
            let n = delta(count);
            (n > 0.0).then(|| delta(sum) / n * scale)
        };
        let batches = delta("aspire_worker_batch_rows_count");
        // Cumulative buckets to per-bucket counts, in order of their bounds.
        let mut bounds: Vec<(f64, String)> = after
            .keys()
            .filter_map(|k| {
                let le = k
                    .strip_prefix("aspire_worker_batch_rows_bucket{le=\"")?
                    .strip_suffix("\"}")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, le.to_string()))
            })
            .collect();
        bounds.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut histogram = Vec::new();
        let mut below = 0.0;
        for (_, le) in bounds {
            let cumulative = delta(&format!("aspire_worker_batch_rows_bucket{{le=\"{le}\"}}"));
            let here = cumulative - below;
            below = cumulative;
            if here > 0.0 {
                histogram.push((le, here));
            }
        }
        let requests = delta("aspire_worker_request_duration_seconds_count");
        Some(Self {
            batches,
            mean_batch_rows: mean(
                "aspire_worker_batch_rows_sum",
                "aspire_worker_batch_rows_count",
                1.0,
            ),
            batch_rows_histogram: histogram,
            mean_forward_pass_us: mean(
                "aspire_worker_forward_pass_seconds_sum",
                "aspire_worker_forward_pass_seconds_count",
                1e6,
            ),
            mean_queue_wait_us: mean(
                "aspire_worker_queue_wait_seconds_sum",
                "aspire_worker_queue_wait_seconds_count",
                1e6,
            ),
            mean_request_us: mean(
                "aspire_worker_request_duration_seconds_sum",
                "aspire_worker_request_duration_seconds_count",
                1e6,
            ),
            requests,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP aspire_worker_batch_rows Rows in one batch.
# TYPE aspire_worker_batch_rows histogram
aspire_worker_batch_rows_bucket{model="mnist",version="1",le="1"} 10
aspire_worker_batch_rows_bucket{model="mnist",version="1",le="2"} 10
aspire_worker_batch_rows_bucket{model="mnist",version="1",le="16"} 10
aspire_worker_batch_rows_bucket{model="mnist",version="1",le="+Inf"} 10
aspire_worker_batch_rows_sum{model="mnist",version="1"} 10
aspire_worker_batch_rows_count{model="mnist",version="1"} 10
aspire_worker_batch_rows_count{model="resnet18",version="1"} 99
aspire_worker_forward_pass_seconds_sum{model="mnist",version="1"} 0.001
aspire_worker_forward_pass_seconds_count{model="mnist",version="1"} 10
"#;
    const AFTER: &str = r#"aspire_worker_batch_rows_bucket{model="mnist",version="1",le="1"} 12
aspire_worker_batch_rows_bucket{model="mnist",version="1",le="2"} 19
aspire_worker_batch_rows_bucket{model="mnist",version="1",le="16"} 20
aspire_worker_batch_rows_bucket{model="mnist",version="1",le="+Inf"} 20
aspire_worker_batch_rows_sum{model="mnist",version="1"} 38
aspire_worker_batch_rows_count{model="mnist",version="1"} 20
aspire_worker_forward_pass_seconds_sum{model="mnist",version="1"} 0.003
aspire_worker_forward_pass_seconds_count{model="mnist",version="1"} 20
process_cpu_seconds_total 4
"#;

    #[test]
    fn the_window_gives_batch_sizes_and_times_of_one_model() {
        let view = WorkerView::between(&parse(BEFORE, "mnist"), &parse(AFTER, "mnist")).unwrap();
        assert_eq!(view.batches, 10.0);
        assert_eq!(view.mean_batch_rows, Some(2.8));
        // In order of the bounds, not of the strings ("16" < "2").
        assert_eq!(
            view.batch_rows_histogram,
            vec![
                ("1".to_string(), 2.0),
                ("2".to_string(), 7.0),
                ("16".to_string(), 1.0)
            ]
        );
        let fp = view.mean_forward_pass_us.unwrap();
        assert!((fp - 200.0).abs() < 1e-6, "{fp}");
        assert_eq!(view.mean_queue_wait_us, None);
    }

    #[test]
    fn no_batch_metrics_no_view() {
        assert_eq!(WorkerView::between(&Sample::new(), &Sample::new()), None);
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }

    #[test]
    fn fetch_reads_a_plain_http_answer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
                .unwrap();
        });
        let body = fetch(&format!("http://{addr}/metrics"), Duration::from_secs(2)).unwrap();
        assert_eq!(body, "abc");
        server.join().unwrap();
        assert!(fetch("https://x/metrics", Duration::from_secs(1)).is_err());
    }
}
