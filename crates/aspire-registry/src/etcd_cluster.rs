//! A throwaway three-member etcd cluster on loopback for fault tests: every member's peer
//! traffic goes through a proxy the test owns, so one member can be cut off from the
//! other two ([`EtcdCluster::isolate`]). The cut-off member keeps serving its client port
//! but loses its leader, which is what clients must notice and leave.
//!
//! Synchronous on purpose (std only), like [`crate::etcd_server::EtcdServer`].
//!
//! Why not one [`crate::TcpProxy`] per member: etcd members share their peer URLs (they
//! are part of the cluster's identity), and traffic between two members flows over
//! connections dialled by either of them, so a proxy that cannot tell who dialled can only
//! cut a link when it cuts both of its ends, and isolating one member that way isolates
//! all three. Each member's peer proxy here reads the first request of every connection
//! for etcd's `X-Server-From` header (the dialling member's id) and cuts what runs to or
//! from the isolated member only.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::etcd_server::{ETCD_BIN_ENV, free_port_array, is_healthy, log_tail};

/// How long the members may take to elect a leader after they were started.
const HEALTHY_WITHIN: Duration = Duration::from_secs(30);
/// How often proxy threads look at the cut and whether the cluster was dropped.
const TICK: Duration = Duration::from_millis(20);

/// Names the members (`m0`, `m1`, `m2`).
const MEMBERS: usize = 3;

/// What every member's peer proxy shares: which members are cut off, and who is who.
#[derive(Default)]
struct Fabric {
    /// Names of the members cut off from the others.
    isolated: Mutex<HashSet<String>>,
    /// Member id (hex, as etcd writes it in `X-Server-From`) to member name.
    names: Mutex<HashMap<String, String>>,
    /// Bumped at every change of the cut: connections of an earlier generation close.
    generation: AtomicU64,
    stopped: AtomicBool,
    connections: Mutex<Vec<TcpStream>>,
}

impl Fabric {
    fn is_isolated(&self, name: &str) -> bool {
        self.isolated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    fn name_of(&self, id: &str) -> Option<String> {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn register(&self, s: &TcpStream) {
        if let Ok(c) = s.try_clone() {
            self.connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(c);
        }
    }

    fn close_all(&self) {
        let mut conns = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        for c in conns.drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// One member: its ports and process.
struct Member {
    name: String,
    client_port: u16,
    /// Where the member listens for peers (behind its proxy).
    peer_port: u16,
    /// The proxy's port: the peer URL the other members use.
    proxy_port: u16,
    metrics_port: u16,
    child: Option<Child>,
}

/// A running three-member etcd cluster; killed when dropped.
pub struct EtcdCluster {
    members: Vec<Member>,
    fabric: Arc<Fabric>,
    bin: PathBuf,
    // Declared last: deleted after the processes were killed in `Drop`.
    dir: TempDir,
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("endpoints", &self.endpoints())
            .finish_non_exhaustive()
    }
}

impl EtcdCluster {
    /// Starts three members on free loopback ports (etcd's default heartbeat of 100 ms
    /// and election timeout of 1 s), their peer traffic through proxies, and waits until
    /// every member is healthy (has a leader). Fails with a sentence and the log tails.
    pub fn start() -> Result<Self, String> {
        let bin =
            std::env::var_os(ETCD_BIN_ENV).map_or_else(|| PathBuf::from("etcd"), PathBuf::from);
        let dir = tempfile::Builder::new()
            .prefix("aspire-etcd-cluster-")
            .tempdir()
            .map_err(|e| format!("cannot create a data dir for etcd: {e}"))?;
        let fabric = Arc::new(Fabric::default());
        let mut members = Vec::with_capacity(MEMBERS);
        for i in 0..MEMBERS {
            let [client_port, peer_port, proxy_port, metrics_port] = free_port_array()?;
            members.push(Member {
                name: format!("m{i}"),
                client_port,
                peer_port,
                proxy_port,
                metrics_port,
                child: None,
            });
        }
        let mut cluster = Self {
            members,
            fabric,
            bin,
            dir,
        };
        for m in &cluster.members {
            start_proxy(m.proxy_port, m.peer_port, &m.name, &cluster.fabric)?;
        }
        for i in 0..MEMBERS {
            cluster.spawn(i)?;
        }
        for i in 0..MEMBERS {
            cluster.wait_healthy(i)?;
        }
        cluster.learn_ids()?;
        Ok(cluster)
    }

    /// The client URLs of every member, `http://127.0.0.1:PORT`, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        (0..MEMBERS).map(|i| self.endpoint(i)).collect()
    }

    /// Member `i`'s client URL (`i` below 3).
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i % MEMBERS].client_port)
    }

    /// Whether member `i` answers `/health` as healthy, which etcd does only while the
    /// member has a leader.
    pub fn has_leader(&self, i: usize) -> bool {
        let port = self.members[i % MEMBERS].metrics_port;
        is_healthy(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// Cuts member `i` off from the other two: every peer connection to or from it is
    /// closed, and new ones get no bytes. Its client port keeps serving; within about an
    /// election timeout it has no leader, while the other two keep (or elect) one.
    pub fn isolate(&self, i: usize) {
        let name = self.members[i % MEMBERS].name.clone();
        self.fabric
            .isolated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name);
        self.fabric.generation.fetch_add(1, Ordering::SeqCst);
        self.fabric.close_all();
    }

    /// Ends every cut: members talk to each other again.
    pub fn heal(&self) {
        self.fabric
            .isolated
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.fabric.generation.fetch_add(1, Ordering::SeqCst);
        self.fabric.close_all();
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.proxy_port))
            .collect::<Vec<_>>()
            .join(",");
        let log_path = self.log_path(i);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let child = Command::new(&self.bin)
            .arg(format!("--name={}", m.name))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join(&m.name).display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!(
                "--listen-peer-urls=http://127.0.0.1:{}",
                m.peer_port
            ))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                m.proxy_port
            ))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=aspire-test")
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                m.metrics_port
            ))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start etcd ({:?}): {e}; install it (scripts/setup.sh) or set \
                     {ETCD_BIN_ENV}",
                    self.bin
                )
            })?;
        self.members[i].child = Some(child);
        Ok(())
    }

    fn wait_healthy(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + HEALTHY_WITHIN;
        loop {
            let exited = self.members[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.members[i].child = None;
                return Err(format!(
                    "etcd member {} exited with {status}; its log ends:\n{}",
                    self.members[i].name,
                    log_tail(&self.log_path(i))
                ));
            }
            if self.has_leader(i) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "etcd member {} was not healthy within {} s; its log ends:\n{}",
                    self.members[i].name,
                    HEALTHY_WITHIN.as_secs(),
                    log_tail(&self.log_path(i))
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Reads the member list from a peer port (`GET /members`), so the proxies can tell
    /// who dialled them.
    fn learn_ids(&self) -> Result<(), String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.members[0].peer_port));
        let body = http_get(addr, "/members")?;
        let list: Vec<serde_json::Value> = serde_json::from_str(&body)
            .map_err(|e| format!("etcd's /members answer is not a JSON list ({e}): {body}"))?;
        let mut names = self.fabric.names.lock().unwrap_or_else(|e| e.into_inner());
        for m in list {
            // A number here; etcd writes it in hex in `X-Server-From`.
            if let (Some(id), Some(name)) = (m["id"].as_u64(), m["name"].as_str()) {
                names.insert(format!("{id:x}"), name.to_string());
            }
        }
        if names.len() != MEMBERS {
            return Err(format!(
                "etcd listed {} members, expected {MEMBERS}: {body}",
                names.len()
            ));
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.fabric.stopped.store(true, Ordering::SeqCst);
        self.fabric.close_all();
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// `GET path` over HTTP/1.0; the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .map_err(|e| format!("cannot ask {addr} for {path}: {e}"))?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    match response.split_once("\r\n\r\n") {
        Some((_, body)) => Ok(body.to_string()),
        None => Err(format!("{addr} answered {path} with no body: {response}")),
    }
}

/// The proxy in front of member `name`'s peer port.
fn start_proxy(port: u16, target: u16, name: &str, fabric: &Arc<Fabric>) -> Result<(), String> {
    let listener = TcpListener::bind(("127.0.0.1", port))
        .map_err(|e| format!("cannot listen on 127.0.0.1:{port}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("cannot set up the proxy on {port}: {e}"))?;
    let target = SocketAddr::from(([127, 0, 0, 1], target));
    let fabric = fabric.clone();
    let name = name.to_string();
    std::thread::Builder::new()
        .name(format!("peer-proxy-{name}"))
        .spawn(move || {
            while !fabric.stopped.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let fabric = fabric.clone();
                        let name = name.clone();
                        let _ = std::thread::Builder::new()
                            .name("peer-proxy-conn".to_string())
                            .spawn(move || connection(client, target, &name, &fabric));
                    }
                    Err(_) => std::thread::sleep(TICK),
                }
            }
        })
        .map_err(|e| format!("cannot start a proxy thread: {e}"))?;
    Ok(())
}

/// Reads up to the end of the first request's headers (or what came within a second).
fn read_head(client: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(1);
    let _ = client.set_read_timeout(Some(TICK * 5));
    while Instant::now() < deadline && head.len() < 64 * 1024 {
        match client.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                head.extend_from_slice(&buf[..n]);
                if head.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    head
}

/// The dialling member's id, from etcd's `X-Server-From` header.
fn server_from(head: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(head);
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case("x-server-from")
            .then(|| value.trim().to_string())
    })
}

/// Serves one connection to member `dest`: forwards it unless it runs to or from an
/// isolated member, then holds it silent until the cut changes.
fn connection(mut client: TcpStream, target: SocketAddr, dest: &str, fabric: &Arc<Fabric>) {
    let generation = fabric.generation.load(Ordering::SeqCst);
    let _ = client.set_nonblocking(false);
    fabric.register(&client);
    let head = read_head(&mut client);
    let source = server_from(&head).and_then(|id| fabric.name_of(&id));
    // A connection that does not say who dialled (version checks, probes) might be
    // reused for messages from an isolated member: while any member is cut off, those
    // are cut too (the healthy members need none of them to keep their quorum).
    let any_isolated = !fabric
        .isolated
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_empty();
    let cut = fabric.is_isolated(dest)
        || match source {
            Some(s) => fabric.is_isolated(&s),
            None => any_isolated,
        };
    let current = || {
        !fabric.stopped.load(Ordering::SeqCst)
            && fabric.generation.load(Ordering::SeqCst) == generation
    };
    if cut {
        let mut sink = [0u8; 4096];
        while current() {
            match client.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(mut server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    fabric.register(&server);
    if server.write_all(&head).is_err() {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
        return;
    }
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up_fabric = fabric.clone();
    let up = std::thread::Builder::new()
        .name("peer-proxy-up".to_string())
        .spawn(move || pump(client, server, &up_fabric, generation));
    pump(s2, c2, fabric, generation);
    if let Ok(up) = up {
        let _ = up.join();
    }
}

/// Copies `from` into `to` until either closes or the cut changes; then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream, fabric: &Fabric, generation: u64) {
    let _ = from.set_read_timeout(Some(TICK * 5));
    let mut buf = vec![0u8; 64 * 1024];
    while !fabric.stopped.load(Ordering::SeqCst)
        && fabric.generation.load(Ordering::SeqCst) == generation
    {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dialling_member_is_read_from_the_header() {
        let head =
            b"GET /raft/stream/msgappv2/8e9e HTTP/1.1\r\nHost: x\r\nX-Server-From: 8e9e\r\n\r\n";
        assert_eq!(server_from(head).as_deref(), Some("8e9e"));
        assert_eq!(server_from(b"GET /version HTTP/1.1\r\n\r\n"), None);
    }
}
