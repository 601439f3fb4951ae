//! The etcd connection: one client, the endpoints it was given (for error sentences) and
//! the bound on every call, so that no caller waits on an etcd that went away.

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::{RegistryError, Result};

/// etcd (3.4 and later) closes connections that ping more often than every 5 s
/// (`--grpc-keepalive-min-time`), so HTTP/2 pings go no faster than this.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// A connected etcd client with its call bound.
#[derive(Clone)]
pub(crate) struct Conn {
    client: Client,
    endpoints: String,
    op_timeout: Duration,
}

impl Conn {
    /// Connects and checks that some endpoint answers: `Client::connect` succeeds at once
    /// even when nothing listens, so only a request tells.
    pub(crate) async fn connect(endpoints: &[String], op_timeout: Duration) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(RegistryError::Unavailable(
                "no etcd endpoints given; pass at least one, e.g. http://127.0.0.1:2379"
                    .to_string(),
            ));
        }
        let joined = endpoints.join(",");
        // Pings find an etcd that vanished without closing the connection (host gone,
        // partition); a killed process is seen at once anyway.
        let options = ConnectOptions::new()
            .with_connect_timeout(op_timeout)
            .with_keep_alive(KEEPALIVE_INTERVAL, op_timeout);
        let client =
            match tokio::time::timeout(op_timeout, Client::connect(endpoints, Some(options))).await
            {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => {
                    return Err(RegistryError::Unavailable(format!(
                        "cannot connect to etcd at {joined}: {e}"
                    )));
                }
                Err(_) => return Err(no_answer(&joined, op_timeout, "no reply")),
            };
        let conn = Self {
            client,
            endpoints: joined,
            op_timeout,
        };
        let mut maintenance = conn.client.maintenance_client();
        match tokio::time::timeout(op_timeout, maintenance.status()).await {
            Ok(Ok(_)) => Ok(conn),
            Ok(Err(e)) => Err(no_answer(&conn.endpoints, op_timeout, &e.to_string())),
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
            Ok(Err(e)) => Err(CallError::Etcd(format!(
                "etcd {what} at {} failed: {e}",
                self.endpoints
            ))),
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
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Etcd(why) | CallError::Timeout(why) => f.write_str(why),
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
