//! The etcd connection: one client, the endpoints it was given and who it is to etcd
//! (for error sentences) and the bound on every call, so that no caller waits on an etcd
//! that went away. etcd's refusals (bad credentials, a role without access to a key) and
//! TLS failures become sentences here.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use tonic::Code;

use super::security::EtcdSecurity;
use crate::{RegistryError, Result};

/// etcd (3.4 and later) closes connections that ping more often than every 5 s
/// (`--grpc-keepalive-min-time`), so HTTP/2 pings go no faster than this.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// A connected etcd client with its call bound.
#[derive(Clone)]
pub(crate) struct Conn {
    client: Client,
    endpoints: String,
    /// Who this client is to etcd ("user 'aspire-worker'"), for refusals.
    who: String,
    op_timeout: Duration,
}

impl Conn {
    /// Connects and checks that some endpoint answers: `Client::connect` succeeds at once
    /// even when nothing listens, so only a request tells.
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
        let joined = endpoints.join(",");
        let who = security.who();
        // Pings find an etcd that vanished without closing the connection (host gone,
        // partition); a killed process is seen at once anyway.
        let options = ConnectOptions::new()
            .with_connect_timeout(op_timeout)
            .with_keep_alive(KEEPALIVE_INTERVAL, op_timeout);
        let options = security.apply(options);
        // With a user, connecting authenticates: a wrong password or a TLS failure shows
        // here; without one, only the status call below talks to etcd.
        let client =
            match tokio::time::timeout(op_timeout, Client::connect(endpoints, Some(options))).await
            {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => return Err(connect_error(&joined, security, op_timeout, &e)),
                Err(_) => return Err(no_answer(&joined, op_timeout, "no reply")),
            };
        let conn = Self {
            client,
            endpoints: joined,
            who,
            op_timeout,
        };
        let mut maintenance = conn.client.maintenance_client();
        match tokio::time::timeout(op_timeout, maintenance.status()).await {
            Ok(Ok(_)) => Ok(conn),
            Ok(Err(e)) => Err(connect_error(&conn.endpoints, security, op_timeout, &e)),
            Err(_) => Err(no_answer(&conn.endpoints, op_timeout, "no reply")),
        }
    }

    /// A handle on the client (cheap: it shares the connection).
    pub(crate) fn client(&self) -> Client {
        self.client.clone()
    }

    /// The endpoints, comma-separated.
    pub(crate) fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Runs one etcd call within the op timeout; `what` names it in the error.
    pub(crate) async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        self.call_raw(what, call)
            .await
            .map_err(|e| e.into_registry_error())
    }

    /// Like [`Self::call`], but keeps etcd's own error, for callers that act on its kind.
    pub(crate) async fn call_raw<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, CallError> {
        match tokio::time::timeout(self.op_timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(match refusal(&e) {
                Some(Refusal::Permission(why)) => CallError::Denied(format!(
                    "etcd at {} denied {what} to {}: {why}; none of that user's etcd \
                     roles grants this access to the key",
                    self.endpoints, self.who
                )),
                Some(Refusal::Credentials(why)) => CallError::Denied(format!(
                    "etcd at {} refused {what} from {}: {why}; check the user and its \
                     password",
                    self.endpoints, self.who
                )),
                None => CallError::Etcd(format!(
                    "etcd {what} at {} failed: {}",
                    self.endpoints,
                    describe(&e)
                )),
            }),
            Err(_) => Err(CallError::Timeout(format!(
                "etcd {what} at {} got no reply within {} ms",
                self.endpoints,
                self.op_timeout.as_millis()
            ))),
        }
    }
}

/// Why a bounded call failed, as a sentence.
#[derive(Debug)]
pub(crate) enum CallError {
    /// etcd (or the transport) answered with an error.
    Etcd(String),
    /// etcd refused this client: bad credentials, or no permission for the key.
    Denied(String),
    /// Nothing answered in time.
    Timeout(String),
}

impl CallError {
    /// etcd says the lease does not exist (revoked, expired, or etcd lost its data).
    pub(crate) fn is_lease_not_found(&self) -> bool {
        matches!(self, CallError::Etcd(why) if why.contains("lease not found"))
    }

    pub(crate) fn into_registry_error(self) -> RegistryError {
        match self {
            CallError::Etcd(why) | CallError::Timeout(why) => RegistryError::Unavailable(why),
            CallError::Denied(why) => RegistryError::Denied(why),
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Etcd(why) | CallError::Timeout(why) | CallError::Denied(why) => {
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
