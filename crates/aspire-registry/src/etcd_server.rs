//! A throwaway single-node etcd for tests and local runs: the `etcd` binary on loopback
//! with its own data dir and free ports, killed when dropped. It can be stopped and
//! restarted on the same ports and data, to test what roles do while etcd is away.
//!
//! Synchronous on purpose (std only), so scripts and any test harness can use it; a start
//! blocks for the ~50 ms etcd takes to become healthy.
//!
//! [`EtcdServer::start_with`] serves the client port over TLS (optionally demanding client
//! certificates) and passes extra flags; health is then polled on a separate plaintext
//! metrics port (`--listen-metrics-urls`), which serves `/health` without TLS.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Environment variable naming the etcd binary (default: `etcd` on the `PATH`).
pub const ETCD_BIN_ENV: &str = "ASPIRE_ETCD_BIN";

/// How long etcd may take to answer healthy after it was started.
const HEALTHY_WITHIN: Duration = Duration::from_secs(15);

/// TLS on a test etcd's client port: PEM files made by the test.
#[derive(Debug, Clone)]
pub struct EtcdServerTls {
    /// etcd's server certificate (`--cert-file`); it must name `127.0.0.1` (or whatever
    /// name clients expect).
    pub cert_file: PathBuf,
    /// Its private key (`--key-file`).
    pub key_file: PathBuf,
    /// The CA that client certificates must be signed by (`--trusted-ca-file`).
    pub trusted_ca_file: PathBuf,
    /// Refuse clients without such a certificate (`--client-cert-auth`). With auth
    /// enabled, etcd then takes the user of a request without a token from its client
    /// certificate's common name.
    pub client_cert_auth: bool,
}

/// How [`EtcdServer::start_with`] starts etcd. The default is what [`EtcdServer::start`]
/// does.
#[derive(Debug, Clone, Default)]
pub struct EtcdServerOptions {
    /// Serve clients over TLS.
    pub tls: Option<EtcdServerTls>,
    /// More etcd flags, e.g. `--auth-token-ttl=2`.
    pub extra_args: Vec<String>,
}

/// A running (or stopped) single-node etcd.
#[derive(Debug)]
pub struct EtcdServer {
    bin: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Plaintext port serving `/health` (and metrics), polled for health because the
    /// client port may be TLS.
    metrics_port: u16,
    options: EtcdServerOptions,
    // Declared last among the paths: it deletes the data dir on drop, after `Drop::drop`
    // killed the process that writes there.
    dir: TempDir,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports with a fresh data dir and waits until it is
    /// healthy. Fails with a sentence (the binary is missing, or etcd's log tail).
    pub fn start() -> Result<Self, String> {
        Self::start_with(EtcdServerOptions::default())
    }

    /// Like [`Self::start`], with TLS and extra flags as `options` say.
    pub fn start_with(options: EtcdServerOptions) -> Result<Self, String> {
        let bin =
            std::env::var_os(ETCD_BIN_ENV).map_or_else(|| PathBuf::from("etcd"), PathBuf::from);
        let dir = tempfile::Builder::new()
            .prefix("aspire-etcd-")
            .tempdir()
            .map_err(|e| format!("cannot create a data dir for etcd: {e}"))?;
        let [client_port, peer_port, metrics_port] = free_port_array()?;
        let mut server = Self {
            bin,
            client_port,
            peer_port,
            metrics_port,
            options,
            dir,
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// The client URL: `http://127.0.0.1:PORT`, or `https://` with TLS.
    pub fn endpoint(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The plaintext URL serving `/health` and `/metrics`, `http://127.0.0.1:PORT`.
    pub fn metrics_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port)
    }

    /// The data dir's parent, a temporary directory removed on drop; tests may keep
    /// their own files (certificates, passwords) there.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The etcd process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (SIGKILL, as a crash would) and waits for it to exit. The data dir
    /// stays, for [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Fails only when it already exited; `wait` reaps it either way.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes etcd (SIGSTOP): it holds its connections but answers nothing, as a stalled
    /// disk or a paused VM would, until [`Self::thaw`]. Fails when etcd is not running or
    /// the signal cannot be sent.
    pub fn freeze(&self) -> Result<(), String> {
        self.signal("STOP")
    }

    /// Lets a frozen etcd run again (SIGCONT).
    pub fn thaw(&self) -> Result<(), String> {
        self.signal("CONT")
    }

    /// Sends `SIG<name>` to etcd with `kill(1)` (no `unsafe` in this crate).
    fn signal(&self, name: &str) -> Result<(), String> {
        let pid = self
            .pid()
            .ok_or_else(|| format!("cannot send SIG{name} to etcd: it is not running"))?;
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("cannot run kill -{name} {pid}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -{name} {pid} (etcd) exited with {status}"))
        }
    }

    /// Starts etcd again on the same ports and data dir (stopping it first if it runs)
    /// and waits until it is healthy.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let client = self.endpoint();
        let metrics = self.metrics_endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.path().join("etcd.log");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let mut command = Command::new(&self.bin);
        if let Some(tls) = &self.options.tls {
            command
                .arg(format!("--cert-file={}", tls.cert_file.display()))
                .arg(format!("--key-file={}", tls.key_file.display()))
                .arg(format!(
                    "--trusted-ca-file={}",
                    tls.trusted_ca_file.display()
                ))
                .arg(format!("--client-cert-auth={}", tls.client_cert_auth));
        }
        let child = command
            .arg("--name=n1")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=n1={peer}"))
            .arg(format!("--listen-metrics-urls={metrics}"))
            // A single node elects itself in ~50 ms instead of ~1 s with these.
            .args(["--heartbeat-interval=10", "--election-timeout=100"])
            .arg("--log-level=warn")
            .args(&self.options.extra_args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    format!(
                        "etcd binary {:?} not found; run scripts/setup.sh (or \
                         `apt-get install etcd-server`), or set {ETCD_BIN_ENV} to its path",
                        self.bin
                    )
                } else {
                    format!("cannot start etcd ({:?}): {e}", self.bin)
                }
            })?;
        self.child = Some(child);
        self.wait_healthy(&log_path)
    }

    fn wait_healthy(&mut self, log_path: &Path) -> Result<(), String> {
        // The metrics port is plaintext even when the client port is TLS.
        let addr = SocketAddr::from(([127, 0, 0, 1], self.metrics_port));
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status} before it was healthy; its log ends:\n{}",
                    log_tail(log_path)
                ));
            }
            if is_healthy(addr) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "etcd on {addr} was not healthy within {} s; its log ends:\n{}",
                    HEALTHY_WITHIN.as_secs(),
                    log_tail(log_path)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `N` distinct free loopback ports. Every listener stays open until all are chosen, so
/// the OS cannot hand out the same port twice.
pub(crate) fn free_port_array<const N: usize>() -> Result<[u16; N], String> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
        *port = listener
            .local_addr()
            .map_err(|e| format!("cannot find a free loopback port: {e}"))?
            .port();
        listeners.push(listener);
    }
    Ok(ports)
}

/// `GET /health` over HTTP/1.0: etcd answers `{"health":"true"}` once it has a leader.
pub(crate) fn is_healthy(addr: SocketAddr) -> bool {
    let timeout = Duration::from_millis(500);
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    // HTTP/1.0: the server closes the connection after the body.
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.") && response.contains("\"health\":\"true\"")
}

pub(crate) fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct() {
        let [a, b, c] = free_port_array().expect("ports");
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
        assert_ne!(a, 0);
    }

    #[test]
    fn nothing_listening_is_not_healthy() {
        let [port] = free_port_array().expect("ports");
        assert!(!is_healthy(SocketAddr::from(([127, 0, 0, 1], port))));
    }

    #[test]
    fn a_frozen_etcd_answers_nothing_until_thawed() {
        let mut server = EtcdServer::start().expect("etcd");
        let addr = SocketAddr::from(([127, 0, 0, 1], server.metrics_port));
        assert!(is_healthy(addr));
        server.freeze().expect("freeze");
        // Stopped, it cannot answer: the kernel accepts the connection, nobody reads it.
        assert!(!is_healthy(addr));
        server.thaw().expect("thaw");
        let log = server.dir().join("etcd.log");
        server.wait_healthy(&log).expect("healthy again after thaw");
        server.stop();
        let err = server.freeze().expect_err("not running");
        assert!(err.contains("not running"), "{err}");
    }

    #[test]
    fn a_missing_binary_says_how_to_install_etcd() {
        let dir = tempfile::tempdir().expect("tempdir");
        let [client_port, peer_port, metrics_port] = free_port_array().expect("ports");
        let mut server = EtcdServer {
            bin: dir.path().join("no-such-etcd"),
            client_port,
            peer_port,
            metrics_port,
            options: EtcdServerOptions::default(),
            dir,
            child: None,
        };
        let err = server.spawn().expect_err("no binary");
        assert!(err.contains("scripts/setup.sh"), "{err}");
        assert!(err.contains(ETCD_BIN_ENV), "{err}");
    }
}
