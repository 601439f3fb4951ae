//! The TLS accept loop: TCP connections from an already-bound listener, a TLS handshake
//! each (on its own task, under a timeout, so a slow or silent peer never holds up the
//! next accept), and the finished TLS streams as the stream of connections tonic's
//! `serve_with_incoming_shutdown` takes. Each handshake uses the config current when the
//! connection was accepted, so a reloaded certificate applies to new connections.
//!
//! A peer that fails its handshake (a plaintext gRPC client, a client without the
//! certificate mTLS asks for, a port scanner) is dropped and logged; tonic never sees it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::reload::ServerTls;

/// A handshake that takes longer is abandoned and its connection closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes under way at once; past this the loop stops accepting until one ends
/// (connections wait in the kernel's backlog), so silent peers cannot exhaust memory.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// The TLS connections accepted on `listener` with `tls`, TCP_NODELAY set, for tonic's
/// `serve_with_incoming_shutdown`. The accept loop, and the poller that re-reads the SSL
/// config file, run until the stream is dropped (tonic drops it on shutdown).
pub fn tls_incoming(
    listener: TcpListener,
    tls: ServerTls,
) -> impl Stream<Item = io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, tls, tx));
    ReceiverStream::new(rx)
}

async fn accept_loop(
    listener: TcpListener,
    tls: ServerTls,
    tx: mpsc::Sender<io::Result<TlsStream<TcpStream>>>,
) {
    let poller = AbortOnDrop(tokio::spawn(tls.clone().poll_file()));
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&pending).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = tx.closed() => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("accepting a TCP connection failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = tx.closed() => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, "cannot set TCP_NODELAY: {e}");
        }
        let acceptor = TlsAcceptor::from(tls.current());
        let tx = tx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(stream) = handshake(acceptor, tcp, peer).await {
                // Fails only when the server is shutting down: the connection just closes.
                let _ = tx.send(Ok(stream)).await;
            }
        });
    }
    drop(poller);
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
            // TCP probes and port checks connect and close without a handshake.
            tracing::debug!(%peer, "connection closed before the TLS handshake: {e}");
            None
        }
        Ok(Err(e)) => {
            tracing::info!(%peer, "TLS handshake refused: {e}");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out after {HANDSHAKE_TIMEOUT:?}; closing");
            None
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestCa, ssl_config_text};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    #[tokio::test]
    async fn a_silent_peer_does_not_hold_up_the_next_handshake() {
        let ca = TestCa::new("ca");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ssl.cfg");
        std::fs::write(
            &file,
            ssl_config_text(&ca.issue(&["127.0.0.1"]), None, false),
        )
        .unwrap();
        let tls = ServerTls::load(&file).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(tls_incoming(listener, tls), async {
                    let _ = stopped.await;
                }),
        );

        // Connected, and never says a word: its handshake waits on its own task.
        let _silent = TcpStream::connect(addr).await.unwrap();
        // Well inside HANDSHAKE_TIMEOUT: an accept loop that waited on the silent peer's
        // handshake would not answer in time.
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.cert_pem()));
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap();
        let answer = tokio::time::timeout(HANDSHAKE_TIMEOUT / 4, async {
            let channel = endpoint.connect().await?;
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(Into::<Box<dyn std::error::Error + Send + Sync>>::into)
        })
        .await;
        assert!(matches!(answer, Ok(Ok(_))), "{answer:?}");

        // Shutdown drops the stream, which ends the accept loop and closes the listener.
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        let mut closed = false;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(closed, "the listener still accepts after shutdown");
    }
}
