//! Helpers shared by the integration tests: locating the built binaries, starting
//! `aspire-server` as a real process on a free loopback port, waiting with `eventually`
//! instead of sleeping, and talking TensorFlow Serving's gRPC API to it.

#![allow(missing_docs)]

pub mod stack;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aspire_proto::serving::model_service_client::ModelServiceClient;
use aspire_proto::serving::prediction_service_client::PredictionServiceClient;
use aspire_proto::serving::{GetModelStatusRequest, ModelSpec, model_spec::VersionChoice};
use tonic::transport::Channel;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A binary built by `cargo build --workspace --bins` in this test's profile.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// The MNIST data `scripts/setup.sh` extracts.
pub fn mnist_data() -> String {
    workspace_root()
        .join("data/mnist_5k.csv.gz")
        .display()
        .to_string()
}

/// Exports mnist `version` trained for `iterations` into `dir` with the real exporter.
pub fn export(dir: &Path, iterations: u32, version: u32) {
    let status = Command::new(bin("mnist-export"))
        .arg(format!("--training-iteration={iterations}"))
        .arg(format!("--model-version={version}"))
        .arg(format!("--data={}", mnist_data()))
        .arg(dir)
        .status()
        .expect("run mnist-export");
    assert!(status.success(), "mnist-export failed");
}

/// Polls `check` until it returns `Some`, or panics after `limit` naming `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A running child process whose stderr is captured; killed when dropped.
pub struct Process {
    child: Child,
    name: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Process {
    /// Starts the workspace binary `name` with `args` (logging at info).
    pub fn start(name: &str, args: &[String]) -> Process {
        let mut child = Command::new(bin(name))
            .args(args)
            .env("RUST_LOG", "info")
            .env("ASPIRE_NUM_BATCH_THREADS", "2")
            .env("ASPIRE_INTRA_OP_THREADS", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("ASPIRE_TEST_ECHO").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        Process {
            child,
            name: name.to_string(),
            log,
        }
    }

    /// Waits until something listens on `addr`; panics with the log if the process dies.
    pub fn wait_listening(&mut self, addr: &str) {
        let start = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited with {status}; log:\n{}", self.name, self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{} did not listen on {addr}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log").join("\n")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{} ignored SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gRPC channel to `addr`.
pub async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// Waits until `version` of `model` is AVAILABLE (state 30) at the server on `addr`.
pub async fn wait_available(addr: &str, model: &str, version: i64, limit: Duration) {
    let client = ModelServiceClient::new(channel(addr).await);
    eventually(
        limit,
        &format!("{model} v{version} AVAILABLE at {addr}"),
        || {
            let mut client = client.clone();
            async move {
                let resp = client
                    .get_model_status(GetModelStatusRequest {
                        model_spec: Some(spec(model, None)),
                    })
                    .await
                    .ok()?;
                resp.into_inner()
                    .model_version_status
                    .iter()
                    .any(|s| s.version == version && s.state == 30)
                    .then_some(())
            }
        },
    )
    .await;
}

/// A running `aspire-server` process; killed when dropped.
pub struct Server {
    process: Process,
    pub addr: String,
}

impl Server {
    /// Starts `aspire-server` on 127.0.0.1 with a free port and `args`, and waits until
    /// it listens.
    pub fn start(args: &[&str]) -> Server {
        let port = free_port();
        let mut all = vec!["--host=127.0.0.1".to_string(), format!("--port={port}")];
        all.extend(args.iter().map(ToString::to_string));
        let mut process = Process::start("aspire-server", &all);
        let addr = format!("127.0.0.1:{port}");
        process.wait_listening(&addr);
        Server { process, addr }
    }

    /// What the server has logged so far.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        self.process.terminate()
    }

    /// A gRPC channel to it.
    pub async fn channel(&self) -> Channel {
        channel(&self.addr).await
    }

    pub async fn predict_client(&self) -> PredictionServiceClient<Channel> {
        PredictionServiceClient::new(self.channel().await).max_decoding_message_size(usize::MAX)
    }

    pub async fn model_client(&self) -> ModelServiceClient<Channel> {
        ModelServiceClient::new(self.channel().await)
    }

    /// Waits until `version` of `model` is AVAILABLE (state 30).
    pub async fn wait_available(&self, model: &str, version: i64, limit: Duration) {
        wait_available(&self.addr, model, version, limit).await;
    }
}

/// A free TCP port on loopback (bound and released; the server binds it right after).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A ModelSpec for `model`, optionally a version.
pub fn spec(model: &str, version: Option<i64>) -> ModelSpec {
    ModelSpec {
        name: model.to_string(),
        version_choice: version.map(VersionChoice::Version),
        signature_name: String::new(),
    }
}

/// Copies a directory tree (like `cp -r src dst`).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).expect("mkdir");
    for entry in std::fs::read_dir(src).expect("read_dir") {
        let entry = entry.expect("entry");
        let to = dst.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), &to).expect("copy");
        }
    }
}

/// The resident set size of process `pid` in bytes (`VmRSS` in /proc).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The sum of every sample of the Prometheus counter `name` whose labels include
/// `label="value"`, scraped from `http://addr/metrics`.
pub fn scrape_sum(addr: &str, name: &str, label: &str, value: &str) -> f64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read metrics");
    let wanted = format!("{label}=\"{value}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&wanted))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
