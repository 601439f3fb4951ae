//! The etcd connection: one etcd-client [`Client`] per endpoint, used one at a time. The
//! client sticks to its current endpoint and moves to the next (round robin) when a call
//! there fails as an absent or leaderless member fails (unavailable, no leader, no reply
//! in time) or when the watch on it breaks; every request carries etcd's "require
//! leader" flag, so a member cut off from its quorum refuses at once instead of serving
//! stale reads or holding writes until they time out. etcd-client's own multi-endpoint
//! channel picks an endpoint per request at random and never avoids such a member, so
//! it is not used.
//!
//! It also holds who the client is to etcd (for error sentences) and the bound on every
//! call, so that no caller waits on an etcd that went away. etcd's refusals (bad
//! credentials, a role without access to a key) and TLS failures become sentences here.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, KvClient, WatchClient};
use tokio::time::Instant;
use tonic::Code;

use super::security::EtcdSecurity;
use crate::{RegistryError, Result};

/// etcd (3.4 and later) closes connections that ping more often than every 5 s
/// (`--grpc-keepalive-min-time`), so HTTP/2 pings go no faster than this.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// The largest response this client decodes (etcd-client's default is tonic's 4 MiB).
/// Listings are paged to stay well under it; it leaves room for one page of values of
/// etcd's largest request size and for a watch response holding one such value.
pub(crate) const MAX_DECODE_BYTES: usize = 16 * 1024 * 1024;

/// A connected etcd client with its call bound and its endpoint failover.
#[derive(Clone)]
pub(crate) struct Conn {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    joined: String,
    /// Who this client is to etcd ("user 'aspire-worker'"), for refusals.
    who: String,
    op_timeout: Duration,
    /// TLS, credentials, require-leader and keep-alive settings of every endpoint's client.
    options: ConnectOptions,
    current: Mutex<Current>,
}

/// The endpoint in use and its client, once connected.
struct Current {
    index: usize,
    /// Bumped on every move, so that several failures seen on one endpoint move only once.
    generation: u64,
    client: Option<Client>,
}

/// The current endpoint's client, as handed to one call or one watch stream.
#[derive(Clone)]
pub(crate) struct Session {
    pub(crate) client: Client,
    pub(crate) endpoint: String,
    generation: u64,
}

impl Session {
    /// The KV client, decoding responses up to [`MAX_DECODE_BYTES`].
    pub(crate) fn kv(&self) -> KvClient {
        self.client
            .kv_client()
            .max_decoding_message_size(MAX_DECODE_BYTES)
    }

    /// The watch client, decoding responses up to [`MAX_DECODE_BYTES`].
    pub(crate) fn watch(&self) -> WatchClient {
        self.client
            .watch_client()
            .max_decoding_message_size(MAX_DECODE_BYTES)
    }
}

impl Conn {
    /// Checks the settings and finds an endpoint that answers with a leader, trying each
    /// in the order given (each within the op timeout). `Client::connect` succeeds at
    /// once even when nothing listens, so only a request tells.
    pub(crate) async fn connect(
        endpoints: &[String],
        op_timeout: Duration,
        security: &EtcdSecurity,
    ) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(RegistryError::Unavailable(
                "no etcd endpoints given; pass at least one, e.g. http://127.0.0.1:2379"
                    .to_string(),
            ));
        }
        security.check(endpoints)?;
        // Pings find an etcd that vanished without closing the connection (host gone,
        // partition); a killed process is seen at once anyway.
        let options = ConnectOptions::new()
            .with_connect_timeout(op_timeout)
            .with_keep_alive(KEEPALIVE_INTERVAL, op_timeout)
            .with_require_leader(true);
        let options = security.apply(options);
        let conn = Self {
            inner: Arc::new(Inner {
                endpoints: endpoints.to_vec(),
                joined: endpoints.join(","),
                who: security.who(),
                op_timeout,
                options,
                current: Mutex::new(Current {
                    index: 0,
                    generation: 0,
                    client: None,
                }),
            }),
        };
        let mut last = None;
        for _ in 0..endpoints.len() {
            let (index, generation) = conn.position();
            let endpoint = &endpoints[index];
            let attempt = async {
                let client = conn.client_at(index, generation).await?;
                client.maintenance_client().status().await
            };
            let err = match tokio::time::timeout(op_timeout, attempt).await {
                Ok(Ok(_)) => return Ok(conn),
                // With a user, connecting authenticates: a wrong password or a TLS failure
                // shows here; without one, only the status call talks to etcd.
                Ok(Err(e)) => connect_error(endpoint, security, op_timeout, &e),
                Err(_) => no_answer(endpoint, op_timeout, "no reply"),
            };
            if matches!(err, RegistryError::Denied(_) | RegistryError::Config(_)) {
                return Err(err);
            }
            conn.leave(generation, &err.to_string());
            last = Some(err);
        }
        Err(last.unwrap_or_else(|| no_answer(&conn.inner.joined, op_timeout, "no reply")))
    }

    /// The endpoints, comma-separated.
    pub(crate) fn endpoints(&self) -> &str {
        &self.inner.joined
    }

    /// The op timeout.
    pub(crate) fn op_timeout(&self) -> Duration {
        self.inner.op_timeout
    }

    /// The endpoint in use now.
    pub(crate) fn current_endpoint(&self) -> String {
        let (index, _) = self.position();
        self.inner.endpoints[index].clone()
    }

    fn position(&self) -> (usize, u64) {
        let cur = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        (cur.index, cur.generation)
    }

    /// The current endpoint's client, connecting it (and authenticating, with a user)
    /// first if needed; fails after the op timeout, moving to the next endpoint when the
    /// failure says this one is away.
    pub(crate) async fn session(&self) -> Result<Session, CallError> {
        let (index, generation) = self.position();
        let endpoint = self.inner.endpoints[index].clone();
        let connect = self.client_at(index, generation);
        match tokio::time::timeout(self.inner.op_timeout, connect).await {
            Ok(Ok(client)) => Ok(Session {
                client,
                endpoint,
                generation,
            }),
            Ok(Err(e)) => {
                let err = self.error(&endpoint, "connect", &e);
                if moves_on(&e) {
                    self.leave(generation, &err.to_string());
                }
                Err(err)
            }
            Err(_) => {
                let err = self.timeout(&endpoint, "connect");
                self.leave(generation, &err.to_string());
                Err(err)
            }
        }
    }

    async fn client_at(&self, index: usize, generation: u64) -> Result<Client, etcd_client::Error> {
        {
            let cur = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
            if cur.generation == generation
                && let Some(client) = &cur.client
            {
                return Ok(client.clone());
            }
        }
        let endpoint = &self.inner.endpoints[index];
        let client = Client::connect([endpoint], Some(self.inner.options.clone())).await?;
        let mut cur = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.generation == generation {
            match &cur.client {
                // Another caller connected meanwhile: share its client.
                Some(existing) => return Ok(existing.clone()),
                None => cur.client = Some(client.clone()),
            }
        }
        Ok(client)
    }

    /// Moves this client to the next endpoint, unless it moved since `session` was
    /// handed out (another failure on the same endpoint already moved it). With one
    /// endpoint it drops the client, so the next call connects afresh.
    pub(crate) fn leave(&self, generation: u64, why: &str) {
        let mut cur = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.generation != generation {
            return;
        }
        let n = self.inner.endpoints.len();
        let from = cur.index;
        cur.index = (from + 1) % n;
        cur.generation += 1;
        cur.client = None;
        if n > 1 {
            tracing::warn!(
                from = %self.inner.endpoints[from],
                to = %self.inner.endpoints[cur.index],
                "leaving etcd endpoint: {why}"
            );
        } else {
            tracing::debug!("reconnecting to etcd: {why}");
        }
    }

    /// Leaves the endpoint `session` is on (its watch broke).
    pub(crate) fn leave_session(&self, session: &Session, why: &str) {
        self.leave(session.generation, why);
    }

    /// Runs one etcd call within the op timeout; `what` names it in the error. `call` is
    /// given the current endpoint's client; when that endpoint fails as an absent or
    /// leaderless one does, the client moves to the next and `call` runs again there,
    /// within what is left of the same bound.
    pub(crate) async fn call<T, F, Fut>(&self, what: &str, call: F) -> Result<T>
    where
        F: FnMut(Session) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_raw(what, call)
            .await
            .map_err(CallError::into_registry_error)
    }

    /// Like [`Self::call`], but keeps etcd's own error, for callers that act on its kind.
    pub(crate) async fn call_raw<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, CallError>
    where
        F: FnMut(Session) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.inner.op_timeout;
        let mut last = None;
        for _ in 0..self.inner.endpoints.len() {
            let (index, generation) = self.position();
            let session = match tokio::time::timeout_at(deadline, self.session()).await {
                Ok(Ok(session)) => session,
                Ok(Err(e)) if e.moves_on() => {
                    last = Some(e);
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    // Connecting (authenticating) there took all the time left.
                    let err = self.timeout(&self.inner.endpoints[index], what);
                    self.leave(generation, &err.to_string());
                    return Err(err);
                }
            };
            match tokio::time::timeout_at(deadline, call(session.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => {
                    let err = self.error(&session.endpoint, what, &e);
                    if !moves_on(&e) {
                        return Err(err);
                    }
                    self.leave(session.generation, &err.to_string());
                    last = Some(err);
                }
                Err(_) => {
                    let err = self.timeout(&session.endpoint, what);
                    self.leave(session.generation, &err.to_string());
                    return Err(err);
                }
            }
        }
        Err(last.unwrap_or_else(|| self.timeout(&self.inner.joined, what)))
    }

    fn timeout(&self, endpoint: &str, what: &str) -> CallError {
        CallError::Timeout(format!(
            "etcd {what} at {endpoint} got no reply within {} ms",
            self.inner.op_timeout.as_millis()
        ))
    }

    /// etcd's error as a sentence naming the endpoint and, for refusals, the user.
    fn error(&self, endpoint: &str, what: &str, e: &etcd_client::Error) -> CallError {
        match refusal(e) {
            Some(Refusal::Permission(why)) => CallError::Denied(format!(
                "etcd at {endpoint} denied {what} to {}: {why}; none of that user's etcd \
                 roles grants this access to the key",
                self.inner.who
            )),
            Some(Refusal::Credentials(why)) => CallError::Denied(format!(
                "etcd at {endpoint} refused {what} from {}: {why}; check the user and its \
                 password",
                self.inner.who
            )),
            None => CallError::Etcd {
                why: format!("etcd {what} at {endpoint} failed: {}", describe(e)),
                moves_on: moves_on(e),
            },
        }
    }
}

/// Whether a failure says this endpoint is away or cannot serve (no leader, no quorum,
/// connection lost), so another endpoint may do better. Refusals, missing leases,
/// compactions and oversized responses are the same everywhere.
pub(crate) fn moves_on(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_) => true,
        etcd_client::Error::LeaseKeepAliveError(why) => !why.contains("lease not found"),
        _ => false,
    }
}

/// Why a bounded call failed, as a sentence.
#[derive(Debug)]
pub(crate) enum CallError {
    /// etcd (or the transport) answered with an error; `moves_on` when another endpoint
    /// may do better.
    Etcd { why: String, moves_on: bool },
    /// etcd refused this client: bad credentials, or no permission for the key.
    Denied(String),
    /// Nothing answered in time.
    Timeout(String),
}

impl CallError {
    /// etcd says the lease does not exist (revoked, expired, or etcd lost its data).
    pub(crate) fn is_lease_not_found(&self) -> bool {
        matches!(self, CallError::Etcd { why, .. } if why.contains("lease not found"))
    }

    /// The response was larger than this client decodes: ask for less.
    pub(crate) fn is_too_large(&self) -> bool {
        matches!(self, CallError::Etcd { why, .. } if why.contains("message length too large"))
    }

    /// The revision asked for was compacted away.
    pub(crate) fn is_compacted(&self) -> bool {
        matches!(self, CallError::Etcd { why, .. } if why.contains("compacted"))
    }

    /// Whether the endpoint was away or leaderless (and the client moved on).
    pub(crate) fn moves_on(&self) -> bool {
        match self {
            CallError::Etcd { moves_on, .. } => *moves_on,
            CallError::Timeout(_) => true,
            CallError::Denied(_) => false,
        }
    }

    pub(crate) fn into_registry_error(self) -> RegistryError {
        match self {
            CallError::Etcd { why, .. } | CallError::Timeout(why) => {
                RegistryError::Unavailable(why)
            }
            CallError::Denied(why) => RegistryError::Denied(why),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Etcd { why, .. } | CallError::Timeout(why) | CallError::Denied(why) => {
                f.write_str(why)
            }
        }
    }
}

fn no_answer(endpoints: &str, op_timeout: Duration, why: &str) -> RegistryError {
    RegistryError::Unavailable(format!(
        "no etcd answered at {endpoints} within {} ms ({why}); check that etcd runs there \
         and the endpoints are right",
        op_timeout.as_millis()
    ))
}

/// Why etcd refused a call, in its own words without the `etcdserver: ` prefix.
enum Refusal {
    /// The user's roles do not grant the key.
    Permission(String),
    /// Wrong user or password, no credentials where auth is on, or credentials where it
    /// is off.
    Credentials(String),
}

/// Tells etcd's refusals from other failures. etcd answers an expired token with
/// `Unauthenticated` too, but etcd-client re-authenticates and retries those itself, so
/// one that reaches here means the credentials no longer work.
fn refusal(e: &etcd_client::Error) -> Option<Refusal> {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return None;
    };
    let why = status
        .message()
        .trim_start_matches("etcdserver: ")
        .to_string();
    match status.code() {
        Code::PermissionDenied => Some(Refusal::Permission(why)),
        Code::Unauthenticated => Some(Refusal::Credentials(why)),
        _ if why.contains("authentication failed")
            || why.contains("authentication is not enabled")
            || why.contains("user name is empty")
            || why.contains("user name not found") =>
        {
            Some(Refusal::Credentials(why))
        }
        _ => None,
    }
}

/// etcd-client's error with every cause under it: a TLS failure is several layers down
/// ("transport error" alone says nothing).
pub(crate) fn describe(e: &etcd_client::Error) -> String {
    let mut text = match e {
        etcd_client::Error::GRpcStatus(status) => {
            format!("{:?}: {}", status.code(), status.message())
        }
        other => other.to_string(),
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        etcd_client::Error::TransportError(t) => std::error::Error::source(t),
        _ => None,
    };
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

/// Whether a failure's text points at TLS rather than at an absent etcd.
fn looks_like_tls(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    ["certificate", "tls", "handshake", "alert", "unknownissuer"]
        .iter()
        .any(|w| lower.contains(w))
}

/// Whether a failure's text says nothing listens or nothing answered: not a TLS problem
/// even when TLS is on.
fn looks_absent(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    [
        "connection refused",
        "timed out",
        "deadline",
        "no route",
        "dns error",
    ]
    .iter()
    .any(|w| lower.contains(w))
}

/// The sentence for a failed connect: refused credentials, failed TLS, or no answer.
fn connect_error(
    endpoints: &str,
    security: &EtcdSecurity,
    op_timeout: Duration,
    e: &etcd_client::Error,
) -> RegistryError {
    let who = security.who();
    match refusal(e) {
        Some(Refusal::Credentials(why)) => RegistryError::Denied(format!(
            "etcd at {endpoints} refused {who}: {why}; check the user and its password"
        )),
        Some(Refusal::Permission(why)) => {
            RegistryError::Denied(format!("etcd at {endpoints} denied {who}: {why}"))
        }
        None => {
            let why = describe(e);
            let tls = security.tls.as_ref();
            // A TLS 1.3 server that wants a client certificate and got none closes the
            // connection after the handshake: the client sees only "connection closed".
            if looks_like_tls(&why) || (tls.is_some() && !looks_absent(&why)) {
                let no_cert = if tls.is_some_and(|t| t.client_identity.is_none()) {
                    " (this client presents no certificate: an etcd started with \
                     --client-cert-auth refuses it)"
                } else {
                    ""
                };
                RegistryError::Unavailable(format!(
                    "TLS with etcd at {endpoints} failed: {why}; check that the CA signed \
                     etcd's certificate, that the certificate names the endpoint's host (or \
                     the TLS server name), and that etcd accepts this client certificate\
                     {no_cert}"
                ))
            } else {
                no_answer(endpoints, op_timeout, &why)
            }
        }
    }
}
