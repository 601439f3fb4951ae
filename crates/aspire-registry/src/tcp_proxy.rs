//! A TCP proxy on loopback that a test owns, to put faults between two processes: pass
//! bytes through, delay them, or cut the link (a partition: existing connections are
//! closed, and new ones are accepted but get no bytes either way until the link is
//! restored). Tests put it between a service and etcd, or between two etcd members.
//!
//! Synchronous on purpose (std threads), like [`crate::etcd_server::EtcdServer`], so any
//! test harness can use it. Dropping it stops accepting and closes every connection.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How often the threads look at the proxy's mode and whether it was dropped.
const TICK: Duration = Duration::from_millis(20);

/// What the proxy does with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Forward at once.
    Pass,
    /// Forward each chunk this long after it arrived (order kept).
    Delay(Duration),
    /// A partition: connections open at the cut are closed; new ones are held open
    /// without a byte forwarded until the mode changes, then closed.
    Cut,
}

struct Shared {
    target: SocketAddr,
    mode: Mutex<ProxyMode>,
    /// Bumped at every cut: connections from an earlier generation close.
    generation: AtomicU64,
    stopped: AtomicBool,
    connections: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn mode(&self) -> ProxyMode {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running proxy from [`TcpProxy::address`] to its target.
pub struct TcpProxy {
    address: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for TcpProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpProxy")
            .field("address", &self.address)
            .field("target", &self.shared.target)
            .field("mode", &self.shared.mode())
            .finish()
    }
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> std::io::Result<Self> {
        Self::start_on(target, 0)
    }

    /// Like [`Self::start`], on `port` (0: a free one). A fixed port lets a proxy be
    /// named in a configuration before its target exists (etcd's peer URLs).
    pub fn start_on(target: SocketAddr, port: u16) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            mode: Mutex::new(ProxyMode::Pass),
            generation: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            connections: Mutex::new(Vec::new()),
        });
        let accept_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("proxy-{address}"))
            .spawn(move || accept_loop(&listener, &accept_shared))?;
        Ok(Self { address, shared })
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:PORT`, for etcd endpoints and URLs.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Changes what the proxy does from now on. Entering [`ProxyMode::Cut`] closes every
    /// open connection; leaving it closes those held during the cut.
    pub fn set_mode(&self, mode: ProxyMode) {
        let mut current = self.shared.mode.lock().unwrap_or_else(|e| e.into_inner());
        let cut_changes = (*current == ProxyMode::Cut) != (mode == ProxyMode::Cut);
        *current = mode;
        drop(current);
        if cut_changes {
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
            close_all(&self.shared);
        }
    }

    /// [`ProxyMode::Cut`].
    pub fn cut(&self) {
        self.set_mode(ProxyMode::Cut);
    }

    /// [`ProxyMode::Pass`].
    pub fn restore(&self) {
        self.set_mode(ProxyMode::Pass);
    }

    /// [`ProxyMode::Delay`].
    pub fn delay(&self, by: Duration) {
        self.set_mode(ProxyMode::Delay(by));
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        close_all(&self.shared);
    }
}

/// Chunks read and the time each is due to be written, with the writer's wake-up.
type ChunkQueue = (Mutex<VecDeque<(Instant, Vec<u8>)>>, Condvar);

fn close_all(shared: &Shared) {
    let mut conns = shared.connections.lock().unwrap_or_else(|e| e.into_inner());
    for c in conns.drain(..) {
        let _ = c.shutdown(Shutdown::Both);
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stopped.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                let shared = shared.clone();
                let _ = std::thread::Builder::new()
                    .name("proxy-conn".to_string())
                    .spawn(move || connection(client, &shared));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(TICK),
            Err(_) => std::thread::sleep(TICK),
        }
    }
}

/// Serves one accepted connection until either side closes, the link is cut (or
/// restored after a cut), or the proxy is dropped.
fn connection(client: TcpStream, shared: &Arc<Shared>) {
    let generation = shared.generation.load(Ordering::SeqCst);
    let _ = client.set_nonblocking(false);
    let register = |s: &TcpStream| {
        if let Ok(c) = s.try_clone() {
            shared
                .connections
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(c);
        }
    };
    register(&client);
    if shared.mode() == ProxyMode::Cut {
        // Held open, silent, until the cut ends (set_mode closes it) or the proxy goes.
        let mut sink = [0u8; 4096];
        let mut held = &client;
        let _ = held.set_read_timeout(Some(TICK * 5));
        while !shared.stopped.load(Ordering::SeqCst)
            && shared.generation.load(Ordering::SeqCst) == generation
        {
            match held.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let Ok(server) = TcpStream::connect_timeout(&shared.target, Duration::from_secs(2)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = server.set_nodelay(true);
    let _ = client.set_nodelay(true);
    register(&server);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up_shared = shared.clone();
    let up = std::thread::Builder::new()
        .name("proxy-up".to_string())
        .spawn(move || pump(client, server, &up_shared, generation));
    pump(s2, c2, shared, generation);
    if let Ok(up) = up {
        let _ = up.join();
    }
}

/// Copies `from` into `to`, each chunk after the delay the mode asks for, until either
/// side closes or the connection's generation ends; then closes both.
fn pump(mut from: TcpStream, to: TcpStream, shared: &Arc<Shared>, generation: u64) {
    // Chunks waiting for their time, written by a thread of their own so that reading
    // goes on meanwhile (a delay must not also throttle).
    let queue: Arc<ChunkQueue> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let queue = queue.clone();
        let done = done.clone();
        let mut to = to.try_clone();
        std::thread::Builder::new()
            .name("proxy-write".to_string())
            .spawn(move || {
                let Ok(to) = to.as_mut() else { return };
                let (lock, ready) = &*queue;
                loop {
                    let next = {
                        let mut q = lock.lock().unwrap_or_else(|e| e.into_inner());
                        loop {
                            if let Some(front) = q.pop_front() {
                                break Some(front);
                            }
                            if done.load(Ordering::SeqCst) {
                                break None;
                            }
                            q = ready
                                .wait_timeout(q, TICK)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                        }
                    };
                    let Some((due, chunk)) = next else { return };
                    let wait = due.saturating_duration_since(Instant::now());
                    if !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                    if to.write_all(&chunk).is_err() {
                        return;
                    }
                }
            })
    };
    let _ = from.set_read_timeout(Some(TICK * 5));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if shared.stopped.load(Ordering::SeqCst)
            || shared.generation.load(Ordering::SeqCst) != generation
        {
            break;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let due = match shared.mode() {
                    ProxyMode::Delay(d) => Instant::now() + d,
                    ProxyMode::Pass | ProxyMode::Cut => Instant::now(),
                };
                let (lock, ready) = &*queue;
                lock.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_back((due, buf[..n].to_vec()));
                ready.notify_one();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    done.store(true, Ordering::SeqCst);
    queue.1.notify_one();
    if let Ok(writer) = writer {
        let _ = writer.join();
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        conn.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        conn.read_exact(&mut got)?;
        Ok(got)
    }

    #[test]
    fn passes_delays_and_cuts() {
        let proxy = TcpProxy::start(echo()).unwrap();
        let mut conn = TcpStream::connect(proxy.address()).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(round_trip(&mut conn, b"hello").unwrap(), b"hello");

        proxy.delay(Duration::from_millis(300));
        let start = Instant::now();
        assert_eq!(round_trip(&mut conn, b"late").unwrap(), b"late");
        // Both directions are delayed.
        assert!(
            start.elapsed() >= Duration::from_millis(600),
            "{:?}",
            start.elapsed()
        );

        proxy.cut();
        // The open connection is closed by the cut.
        assert!(round_trip(&mut conn, b"x").is_err());
        // A new one is accepted but nothing comes back.
        let mut held = TcpStream::connect(proxy.address()).unwrap();
        held.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let err = round_trip(&mut held, b"y").unwrap_err();
        assert!(
            matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{err:?}"
        );

        proxy.restore();
        let mut again = TcpStream::connect(proxy.address()).unwrap();
        again
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(round_trip(&mut again, b"back").unwrap(), b"back");
    }
}
