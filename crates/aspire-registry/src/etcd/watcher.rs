//! The watch that keeps an etcd registry's [`ClusterState`] current: list the prefix,
//! watch it from the listed revision + 1, and when the watch breaks (etcd restarted,
//! history compacted, the member lost its leader or stopped answering) back off, list
//! again and resume. While etcd is away subscribers keep the last state: an outage is
//! not an empty cluster.
//!
//! A stream can die silently (a frozen member, a partition that drops packets): every
//! [`WatchTuning::progress_interval`] the watcher asks etcd for a progress report on the
//! stream and asks the member whether it has a leader; a stream that brings no message
//! of any kind within [`WatchTuning::stall_timeout`], or a member without a leader,
//! counts as broken, and the client moves to its next endpoint.
//!
//! Listings read the prefix in pages of at most [`WatchTuning::page_size`] keys, every
//! page at the revision of the first, so that no response grows with the cluster; a
//! page larger than the client decodes is asked for again in smaller pages.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aspire_core::ClusterState;
use aspire_core::keys::KeySchema;
use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, Session};
use crate::Result;

/// First pause before listing again after the watch broke; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between attempts while etcd is away.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How the watcher pages listings and checks its streams.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WatchTuning {
    /// Most keys per listing page.
    pub(crate) page_size: u32,
    /// How often a stream is asked for progress and the member for its leader.
    pub(crate) progress_interval: Duration,
    /// A stream without any message this long is broken.
    pub(crate) stall_timeout: Duration,
}

/// Counts of what the watcher did, for tests and logs.
#[derive(Debug, Default)]
pub(crate) struct WatchStats {
    /// Watch streams opened (the first one included).
    pub(crate) streams: AtomicU64,
}

/// The first key after every key under `root`: `root` with its last byte below 0xff
/// incremented (what etcd's "prefix" range end is).
fn prefix_end(root: &str) -> Vec<u8> {
    let mut end = root.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from `root` on.
    vec![0]
}

/// Reads every key under `schema`'s prefix: the parsed state and the revision it is at.
/// Pages of `page_size` keys, all read at the revision of the first page; a page too
/// large to decode is read again in halves; a listing whose revision was compacted
/// meanwhile starts over.
pub(crate) async fn list(
    conn: &Conn,
    schema: &KeySchema,
    page_size: u32,
) -> Result<(ClusterState, i64)> {
    let root = schema.root();
    let end = prefix_end(&root);
    let mut limit = i64::from(page_size.max(1));
    'listing: for _ in 0..3 {
        let mut state = ClusterState::default();
        let mut from = root.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(limit);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let key = from.clone();
            let page = conn
                .call_raw(&format!("list {root}"), |s: Session| {
                    let (key, options) = (key.clone(), options.clone());
                    async move { s.kv().get(key, Some(options)).await }
                })
                .await;
            let resp = match page {
                Ok(resp) => resp,
                Err(e) if e.is_too_large() && limit > 1 => {
                    limit = (limit / 2).max(1);
                    tracing::debug!(limit, "a listing page was too large; asking for fewer keys");
                    continue;
                }
                Err(e) if e.is_compacted() && revision > 0 => {
                    tracing::debug!("revision {revision} was compacted while listing; again");
                    continue 'listing;
                }
                Err(e) => return Err(e.into_registry_error()),
            };
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                state.apply(schema, &String::from_utf8_lossy(kv.key()), Some(kv.value()));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((state, revision)),
            }
        }
    }
    Err(crate::RegistryError::Unavailable(format!(
        "listing {root} kept losing its revision to compaction; etcd compacts faster than \
         the prefix can be read"
    )))
}

/// Why one watch stream ended.
enum Broke {
    /// The registry is being dropped or closed.
    Cancelled,
    /// Its start revision was compacted: list again on the same endpoint.
    Compacted(String),
    /// The endpoint failed (ended the stream, lost its leader, stopped answering):
    /// move to the next endpoint, then list again.
    Endpoint(Box<Session>, String),
    /// Opening the stream failed (the call already moved on if it should).
    Open(String),
}

/// Keeps `tx` current until `cancel` fires. `revision` is the one the initial list was at.
pub(crate) async fn run(
    conn: Conn,
    schema: KeySchema,
    tx: Arc<watch::Sender<Arc<ClusterState>>>,
    mut revision: i64,
    tuning: WatchTuning,
    stats: Arc<WatchStats>,
    cancel: CancellationToken,
) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let broke = watch_from(
            &conn,
            &schema,
            &tx,
            revision + 1,
            tuning,
            &stats,
            &mut backoff,
            &cancel,
        )
        .await;
        let why = match broke {
            Broke::Cancelled => return,
            Broke::Compacted(why) | Broke::Open(why) => why,
            Broke::Endpoint(session, why) => {
                conn.leave_session(&session, &why);
                // Another endpoint is tried at once: the pause is for an etcd that is away.
                backoff = MIN_BACKOFF;
                why
            }
        };
        tracing::warn!(
            prefix = schema.prefix(),
            "registry watch broke: {why}; listing again"
        );
        // Events may have been missed while no watch ran; only a fresh list is sure to
        // hold every key, and its revision is where the next watch starts.
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            first = false;
            let listed = tokio::select! {
                () = cancel.cancelled() => return,
                r = list(&conn, &schema, tuning.page_size) => r,
            };
            match listed {
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
#[allow(clippy::too_many_arguments)]
async fn watch_from(
    conn: &Conn,
    schema: &KeySchema,
    tx: &watch::Sender<Arc<ClusterState>>,
    start: i64,
    tuning: WatchTuning,
    stats: &WatchStats,
    backoff: &mut Duration,
    cancel: &CancellationToken,
) -> Broke {
    let root = schema.root();
    // Large transactions arrive in fragments rather than as one oversized response.
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(start)
        .with_fragment();
    let what = format!("watch {root}");
    let opened = tokio::select! {
        () = cancel.cancelled() => return Broke::Cancelled,
        r = conn.call_raw(&what, |s: Session| {
            let (key, options) = (root.clone(), options.clone());
            async move {
                let stream = s.watch().watch(key, Some(options)).await?;
                Ok((s, stream))
            }
        }) => r,
    };
    let (session, stream) = match opened {
        Ok(opened) => opened,
        Err(e) => return Broke::Open(e.to_string()),
    };
    stats.streams.fetch_add(1, Ordering::Relaxed);
    let (mut requests, mut stream) = stream.split();
    let endpoint = session.endpoint.clone();
    let broke = |why: String| Broke::Endpoint(Box::new(session.clone()), why);
    let mut progress = tokio::time::interval(tuning.progress_interval);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_message = tokio::time::Instant::now();
    // The leader check runs beside the stream; its answer arrives on this channel.
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::channel::<String>(1);
    let mut probe = ProbeTask(None);
    loop {
        let stall = tokio::time::sleep_until(last_message + tuning.stall_timeout);
        let message = tokio::select! {
            () = cancel.cancelled() => return Broke::Cancelled,
            m = stream.message() => m,
            _ = progress.tick() => {
                if let Err(e) = requests.request_progress().await {
                    return broke(format!("asking {endpoint} for watch progress failed: {e}"));
                }
                let still_probing = probe.0.as_ref().is_some_and(|p| !p.is_finished());
                if !still_probing {
                    probe.0 = Some(tokio::spawn(probe_leader(
                        session.clone(),
                        conn.op_timeout(),
                        probe_tx.clone(),
                    )));
                }
                continue;
            }
            Some(why) = probe_rx.recv() => return broke(why),
            () = stall => {
                return broke(format!(
                    "the watch on {endpoint} brought no message within {} ms (progress \
                     asked every {} ms)",
                    tuning.stall_timeout.as_millis(),
                    tuning.progress_interval.as_millis()
                ));
            }
        };
        last_message = tokio::time::Instant::now();
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => return broke(format!("etcd at {endpoint} ended the watch stream")),
            Err(e) => {
                return broke(format!(
                    "the watch stream on {endpoint} failed: {}",
                    super::conn::describe(&e)
                ));
            }
        };
        if resp.compact_revision() > 0 {
            return Broke::Compacted(format!(
                "revision {start} was compacted (oldest kept: {})",
                resp.compact_revision()
            ));
        }
        if resp.canceled() {
            return broke(format!(
                "etcd at {endpoint} cancelled the watch: {}",
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
        // One send per response: a transaction's keys reach subscribers together (unless
        // etcd fragmented it, when each fragment is applied as it comes).
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

/// The leader check in flight, aborted when the watch ends.
struct ProbeTask(Option<tokio::task::JoinHandle<()>>);

impl Drop for ProbeTask {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// Asks the member behind `session` for its status (with "require leader", as every
/// request): a member cut off from its quorum refuses ("no leader") or names no leader;
/// one that does not answer within `op_timeout` is away. Sends the reason when so.
async fn probe_leader(
    session: Session,
    op_timeout: Duration,
    out: tokio::sync::mpsc::Sender<String>,
) {
    let mut maintenance = session.client.maintenance_client();
    let why = match tokio::time::timeout(op_timeout, maintenance.status()).await {
        Ok(Ok(status)) if status.leader() != 0 => return,
        Ok(Ok(_)) => format!("etcd at {} has no leader", session.endpoint),
        Ok(Err(e)) if super::conn::moves_on(&e) => format!(
            "etcd at {} cannot serve: {}",
            session.endpoint,
            super::conn::describe(&e)
        ),
        // A refusal (say, a user without status rights) says nothing about the leader.
        Ok(Err(_)) => return,
        Err(_) => format!(
            "etcd at {} did not answer a status request within {} ms",
            session.endpoint,
            op_timeout.as_millis()
        ),
    };
    let _ = out.send(why).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd_server::EtcdServer;

    #[test]
    fn the_prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end("/aspire/"), b"/aspire0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
        assert_eq!(prefix_end(""), vec![0]);
    }

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
        let mut kv = conn.session().await.expect("session").kv();
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
        let tuning = WatchTuning {
            page_size: 2,
            progress_interval: Duration::from_millis(200),
            stall_timeout: Duration::from_secs(1),
        };
        let stats = Arc::new(WatchStats::default());
        let task = tokio::spawn(run(
            conn,
            schema,
            tx,
            stale_revision,
            tuning,
            stats,
            cancel.clone(),
        ));
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
