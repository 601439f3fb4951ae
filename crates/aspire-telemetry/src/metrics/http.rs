//! The `/metrics` endpoint: HTTP/1.1 on its own listener (hyper, already in the tree
//! through tonic), answering `GET /metrics` with the registry in Prometheus' text format.
//! Also [`scrape`] and [`sample`], which read such an endpoint back.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// A client that sends no request head within this long is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoint, running on the current tokio runtime until dropped.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl MetricsServer {
    /// Serves `registry` on `listener`. Dropping the server closes the listener and
    /// every connection.
    pub fn start(listener: TcpListener, registry: Registry) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        tracing::info!(address = %addr, "serving Prometheus metrics on /metrics");
        let task = tokio::spawn(accept_loop(listener, registry));
        Ok(Self { addr, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, registry: Registry) {
    // Owned here, so aborting this task drops (and aborts) every connection too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!("metrics endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let registry = registry.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        std::future::ready(Ok::<_, Infallible>(respond(&registry, &req)))
                    });
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    if let Err(e) = served {
                        tracing::debug!("metrics endpoint: connection ended: {e}");
                    }
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

fn respond(registry: &Registry, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found; Prometheus metrics are at /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    let encoder = TextEncoder::new();
    let mut body = Vec::with_capacity(16 * 1024);
    if let Err(e) = encoder.encode(&registry.gather(), &mut body) {
        tracing::error!("metrics endpoint: encoding failed: {e}");
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n");
    }
    let mut response = Response::new(Full::new(Bytes::from(body)));
    if let Ok(value) = HeaderValue::from_str(encoder.format_type()) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Fetches `http://{addr}/metrics` and returns the body; an error unless the answer is
/// 200. One HTTP/1.0 request on a fresh connection: enough for tests and tools.
pub async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8(raw).map_err(std::io::Error::other)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of the HTTP head"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(std::io::Error::other(format!("{addr}/metrics: {status}")));
    }
    Ok(body.to_string())
}

/// The value of the sample `name` whose labels are exactly `labels` (in any order) in a
/// scrape in the text format; `None` when there is no such sample.
pub fn sample(scraped: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<&str, &str> = labels.iter().copied().collect();
    scraped
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, found) = match series.split_once('{') {
                Some((metric, rest)) => (metric, parse_labels(rest.strip_suffix('}')?)?),
                None => (series, BTreeMap::new()),
            };
            (metric == name && found == wanted).then(|| value.parse().ok())?
        })
}

/// `a="x",b="y"` as a map. Aspire's label values never hold quotes or commas, so no
/// unescaping is needed.
fn parse_labels(text: &str) -> Option<BTreeMap<&str, &str>> {
    text.split(',')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key, value.strip_prefix('"')?.strip_suffix('"')?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{IntCounterVec, Opts};

    #[test]
    fn samples_are_found_by_exact_labels() {
        let text = "# HELP x_total x\n# TYPE x_total counter\n\
                    x_total{code=\"OK\",model=\"m\"} 3\n\
                    x_total{code=\"NotFound\",model=\"\"} 1\n\
                    y 2.5\n";
        assert_eq!(
            sample(text, "x_total", &[("model", "m"), ("code", "OK")]),
            Some(3.0)
        );
        assert_eq!(
            sample(text, "x_total", &[("code", "NotFound"), ("model", "")]),
            Some(1.0)
        );
        assert_eq!(sample(text, "x_total", &[("model", "m")]), None);
        assert_eq!(sample(text, "y", &[]), Some(2.5));
        assert_eq!(sample(text, "z", &[]), None);
    }

    #[tokio::test]
    async fn serves_the_registry_on_metrics_only() {
        let registry = Registry::new();
        let counter = IntCounterVec::new(Opts::new("t_requests_total", "help"), &["code"]).unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        counter.with_label_values(&["OK"]).inc_by(2);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = MetricsServer::start(listener, registry).unwrap();
        let addr = server.local_addr();

        let text = scrape(addr).await.unwrap();
        assert_eq!(
            sample(&text, "t_requests_total", &[("code", "OK")]),
            Some(2.0)
        );
        counter.with_label_values(&["OK"]).inc();
        let text = scrape(addr).await.unwrap();
        assert_eq!(
            sample(&text, "t_requests_total", &[("code", "OK")]),
            Some(3.0)
        );

        let raw = |request: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = raw("GET /metrics HTTP/1.0\r\n\r\n").await;
        assert!(
            ok.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{ok}"
        );
        let missing = raw("GET / HTTP/1.0\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.0 404"), "{missing}");
        let post = raw("POST /metrics HTTP/1.0\r\ncontent-length: 0\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.0 405"), "{post}");

        drop(server);
        // The listener closes with the server (give the aborted task a moment to drop).
        let mut refused = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "still listening after drop");
    }
}
