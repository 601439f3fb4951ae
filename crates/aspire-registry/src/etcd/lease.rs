//! Worker records and the lease they live under. The lease is granted on the first
//! registration and kept alive every third of its TTL; when etcd says it is gone (expired
//! during an outage, revoked, or etcd lost its data) a new one is granted and every
//! remembered record is put again, so a worker re-registers by itself. While keep-alives
//! or re-registrations fail, they are retried every `retry` (500 ms by default) rather
//! than every third of the TTL, so a worker is back within about that long of etcd
//! answering again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::PutOptions;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::closed;
use super::conn::{CallError, Conn};
use crate::Result;

/// The lease and the records this registry keeps under it.
pub(crate) struct WorkerLease {
    conn: Conn,
    ttl: Duration,
    retry: Duration,
    // A tokio mutex, held across etcd calls: a registration and a lease renewal must
    // not interleave, or a record could be put under a lease that is being replaced.
    state: Mutex<LeaseState>,
}

#[derive(Default)]
struct LeaseState {
    /// The granted lease; `None` before the first registration or after it was lost.
    lease: Option<i64>,
    /// The last record put per worker key: what to put again under a new lease.
    records: BTreeMap<String, Vec<u8>>,
    /// Some record may not be in etcd (its put failed): put them all on the next tick.
    stale: bool,
    closed: bool,
}

impl WorkerLease {
    pub(crate) fn new(conn: Conn, ttl: Duration, retry: Duration) -> Self {
        Self {
            conn,
            ttl,
            retry: retry.max(Duration::from_millis(10)),
            state: Mutex::new(LeaseState::default()),
        }
    }

    /// Puts a worker record under the lease, granting one if needed, and remembers it.
    pub(crate) async fn put(&self, key: String, value: Vec<u8>) -> Result<()> {
        let mut st = self.state.lock().await;
        if st.closed {
            return Err(closed());
        }
        st.records.insert(key.clone(), value.clone());
        let result = match st.lease {
            Some(lease) if !st.stale => match self.put_one(&key, &value, lease).await {
                Err(e) if e.is_lease_not_found() => {
                    tracing::warn!("worker lease {lease:x} is gone; granting a new one");
                    st.lease = None;
                    self.restore(&mut st).await
                }
                other => other.map_err(CallError::into_registry_error),
            },
            _ => self.restore(&mut st).await,
        };
        if result.is_err() {
            st.stale = true;
        }
        result
    }

    /// Deletes a worker record and forgets it, so it is not put again.
    pub(crate) async fn remove(&self, key: &str) -> Result<()> {
        let mut st = self.state.lock().await;
        st.records.remove(key);
        self.conn
            .call(&format!("delete {key}"), |s| {
                let key = key.to_string();
                async move { s.kv().delete(key, None).await }
            })
            .await
            .map(drop)
    }

    /// Revokes the lease (etcd deletes every record under it) and refuses later puts.
    pub(crate) async fn close(&self) -> Result<()> {
        let mut st = self.state.lock().await;
        st.closed = true;
        st.records.clear();
        let Some(lease) = st.lease.take() else {
            return Ok(());
        };
        match self
            .conn
            .call_raw(&format!("revoke lease {lease:x}"), |s| async move {
                s.client.lease_client().revoke(lease).await
            })
            .await
        {
            // Already gone: its records went with it.
            Err(e) if e.is_lease_not_found() => Ok(()),
            other => other.map(drop).map_err(CallError::into_registry_error),
        }
    }

    /// Keeps the lease alive until `cancel` fires; renews it and puts every record again
    /// when it was lost, and retries records whose put failed.
    pub(crate) async fn keep_alive(self: Arc<Self>, cancel: CancellationToken) {
        let interval = (self.ttl / 3).max(Duration::from_millis(100));
        // After a failure the next attempt comes sooner: the lease may be expiring.
        let mut failing = false;
        loop {
            let stale = {
                let st = self.state.lock().await;
                st.stale || (st.lease.is_none() && !st.records.is_empty())
            };
            let pause = if failing || stale {
                self.retry.min(interval)
            } else {
                interval
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
            let lease = {
                let st = self.state.lock().await;
                if st.closed {
                    return;
                }
                st.lease
            };
            // Not under the lock: a keep-alive to an etcd that is away takes up to the op
            // timeout, and registrations need not wait for it.
            let lost = match lease {
                Some(lease) => match self.renew(lease).await {
                    Ok(()) => false,
                    Err(e) if e.is_lease_not_found() => {
                        tracing::warn!("worker lease {lease:x} was lost; re-registering workers");
                        true
                    }
                    Err(e) => {
                        // etcd away: the lease outlives a short outage (and a restart
                        // renews it), so keep it until etcd says it is gone.
                        tracing::debug!("keep-alive of worker lease {lease:x} failed: {e}");
                        failing = true;
                        continue;
                    }
                },
                None => false,
            };
            failing = false;
            let mut st = self.state.lock().await;
            if st.closed || st.lease != lease {
                // Closed, or a registration replaced the lease meanwhile.
                continue;
            }
            if lost {
                st.lease = None;
            }
            let needs_put = lost || st.stale || (st.lease.is_none() && !st.records.is_empty());
            if needs_put {
                match self.restore(&mut st).await {
                    Ok(()) => tracing::info!(workers = st.records.len(), "workers re-registered"),
                    Err(e) => {
                        tracing::warn!("re-registering workers failed, will retry: {e}");
                        failing = true;
                    }
                }
            }
        }
    }

    /// One keep-alive round trip. etcd-client's `keep_alive` opens a stream and waits for
    /// the first answer; a stream per tick needs no repair when etcd restarts.
    async fn renew(&self, lease: i64) -> Result<(), CallError> {
        self.conn
            .call_raw(&format!("keep-alive of lease {lease:x}"), |s| async move {
                s.client.lease_client().keep_alive(lease).await
            })
            .await
            .map(drop)
    }

    /// Grants a lease when there is none and puts every remembered record under it.
    async fn restore(&self, st: &mut LeaseState) -> Result<()> {
        let lease = match st.lease {
            Some(lease) => lease,
            None => {
                // etcd counts whole seconds: round up, never down to an instant expiry.
                let secs = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
                let ttl = i64::try_from(secs.max(1)).unwrap_or(i64::MAX);
                let granted = self
                    .conn
                    .call("grant a worker lease", |s| async move {
                        s.client.lease_client().grant(ttl, None).await
                    })
                    .await?;
                st.lease = Some(granted.id());
                granted.id()
            }
        };
        for (key, value) in &st.records {
            if let Err(e) = self.put_one(key, value, lease).await {
                if e.is_lease_not_found() {
                    st.lease = None;
                }
                st.stale = true;
                return Err(e.into_registry_error());
            }
        }
        st.stale = false;
        Ok(())
    }

    async fn put_one(&self, key: &str, value: &[u8], lease: i64) -> Result<(), CallError> {
        self.conn
            .call_raw(&format!("put {key}"), |s| {
                let (key, value) = (key.to_string(), value.to_vec());
                async move {
                    let options = PutOptions::new().with_lease(lease);
                    s.kv().put(key, value, Some(options)).await
                }
            })
            .await
            .map(drop)
    }
}
