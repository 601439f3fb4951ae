//! The watch that keeps an etcd registry's [`ClusterState`] current: list the prefix,
//! watch it from the listed revision + 1, and when the watch breaks (etcd restarted,
//! history compacted) back off, list again and resume. While etcd is away subscribers
//! keep the last state: an outage is not an empty cluster.

use std::sync::Arc;
use std::time::Duration;

use aspire_core::ClusterState;
use aspire_core::keys::KeySchema;
use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::conn::Conn;
use crate::Result;

/// First pause before listing again after the watch broke; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts while etcd is away.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Reads every key under `schema`'s prefix: the parsed state and the revision it is at.
pub(crate) async fn list(conn: &Conn, schema: &KeySchema) -> Result<(ClusterState, i64)> {
    let mut kv = conn.client().kv_client();
    let root = schema.root();
    let resp = conn
        .call(
            &format!("list {root}"),
            kv.get(root.as_bytes(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
    let mut state = ClusterState::default();
    for kv in resp.kvs() {
        state.apply(schema, &String::from_utf8_lossy(kv.key()), Some(kv.value()));
    }
    let revision = resp.header().map_or(0, |h| h.revision());
    Ok((state, revision))
}

/// Why one watch stream ended.
#[derive(Debug)]
enum Broke {
    /// The registry is being dropped or closed.
    Cancelled,
    /// Anything else: the sentence is logged, then the prefix is listed again.
    Because(String),
}

/// Keeps `tx` current until `cancel` fires. `revision` is the one the initial list was at.
pub(crate) async fn run(
    conn: Conn,
    schema: KeySchema,
    tx: Arc<watch::Sender<Arc<ClusterState>>>,
    mut revision: i64,
    cancel: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let why = match watch_from(&conn, &schema, &tx, revision + 1, &mut backoff, &cancel).await {
            Broke::Cancelled => return,
            Broke::Because(why) => why,
        };
        tracing::warn!(
            prefix = schema.prefix(),
            "registry watch broke: {why}; listing again"
        );
        // Events may have been missed while no watch ran; only a fresh list is sure to
        // hold every key, and its revision is where the next watch starts.
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match list(&conn, &schema).await {
                Ok((state, rev)) => {
                    revision = rev;
                    // Unchanged after a restart, usually: then nobody needs waking.
                    tx.send_if_modified(|current| {
                        let changed = **current != state;
                        if changed {
                            *current = Arc::new(state);
                        }
                        changed
                    });
                    break;
                }
                Err(e) => tracing::debug!(prefix = schema.prefix(), "list failed: {e}"),
            }
        }
    }
}

/// Watches the prefix from `start` and applies what it sees until the stream breaks.
async fn watch_from(
    conn: &Conn,
    schema: &KeySchema,
    tx: &watch::Sender<Arc<ClusterState>>,
    start: i64,
    backoff: &mut Duration,
    cancel: &CancellationToken,
) -> Broke {
    let root = schema.root();
    let mut client = conn.client().watch_client();
    let options = WatchOptions::new().with_prefix().with_start_revision(start);
    let what = format!("watch {root}");
    let mut stream = tokio::select! {
        () = cancel.cancelled() => return Broke::Cancelled,
        r = conn.call(&what, client.watch(root.as_bytes(), Some(options))) => {
            match r {
                Ok(stream) => stream,
                Err(e) => return Broke::Because(e.to_string()),
            }
        }
    };
    loop {
        let message = tokio::select! {
            () = cancel.cancelled() => return Broke::Cancelled,
            m = stream.message() => m,
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => return Broke::Because("etcd ended the watch stream".to_string()),
            Err(e) => return Broke::Because(format!("watch stream failed: {e}")),
        };
        if resp.compact_revision() > 0 {
            return Broke::Because(format!(
                "revision {start} was compacted (oldest kept: {})",
                resp.compact_revision()
            ));
        }
        if resp.canceled() {
            return Broke::Because(format!(
                "etcd cancelled the watch: {}",
                resp.cancel_reason()
            ));
        }
        if resp.created() {
            // The watch is established: the next failure is a new outage, not this one.
            *backoff = MIN_BACKOFF;
        }
        let events = resp.events();
        if events.is_empty() {
            continue;
        }
        // One send per response: a transaction's keys reach subscribers together.
        tx.send_modify(|current| {
            let state = Arc::make_mut(current);
            for event in events {
                let Some(kv) = event.kv() else { continue };
                let value = match event.event_type() {
                    EventType::Put => Some(kv.value()),
                    EventType::Delete => None,
                };
                state.apply(schema, &String::from_utf8_lossy(kv.key()), value);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd_server::EtcdServer;

    /// A watch that starts behind a compaction cannot replay history: it must list again.
    #[tokio::test]
    async fn a_watch_behind_a_compaction_lists_again() {
        let server = EtcdServer::start().unwrap_or_else(|e| panic!("{e}"));
        let conn = Conn::connect(
            &[server.endpoint()],
            Duration::from_secs(2),
            &crate::EtcdSecurity::default(),
        )
        .await
        .expect("connect");
        let schema = KeySchema::new("/compacted");
        let mut kv = conn.client().kv_client();
        let record = |address: &str| {
            crate::encode_json(&aspire_core::WorkerRecord {
                address: address.to_string(),
                ..Default::default()
            })
            .expect("encode")
        };
        let first = kv
            .put("/compacted/workers/w1", record("a0"), None)
            .await
            .expect("put");
        let stale_revision = first.header().expect("header").revision();
        let mut last = first;
        for i in 1..=3 {
            last = kv
                .put("/compacted/workers/w1", record(&format!("a{i}")), None)
                .await
                .expect("put");
        }
        let now = last.header().expect("header").revision();
        kv.compact(now, None).await.expect("compact");

        let tx = Arc::new(watch::Sender::new(Arc::new(ClusterState::default())));
        let mut rx = tx.subscribe();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(conn, schema, tx, stale_revision, cancel.clone()));
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let address = rx
                    .borrow_and_update()
                    .workers
                    .get("w1")
                    .map(|w| w.address.clone());
                if let Some(address) = address {
                    return address;
                }
                rx.changed().await.expect("sender alive");
            }
        })
        .await
        .expect("the re-list brings w1");
        assert_eq!(seen, "a3");
        cancel.cancel();
        task.await.expect("the watch task ends when cancelled");
    }
}
