//! The soak's processes: etcd (a throwaway [`EtcdServer`]), aspire-discovery watching a
//! directory, two aspire-workers and aspire-router, all on loopback, started from one
//! binary directory with their logs under the soak directory; and the model versions,
//! exported once with `mnist-export` and copied into the watched directory one by one.
//!
//! Synchronous (std processes); the soak calls it from blocking tasks.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aspire_registry::etcd_server::EtcdServer;

use crate::error::{Error, Result};

/// The model the soak serves.
pub const MODEL: &str = "mnist";

/// The etcd prefix of the soak's keys.
pub const PREFIX: &str = "/aspire-soak";

/// How long a started role may take to listen.
const LISTEN_WITHIN: Duration = Duration::from_secs(60);

/// How long `aspirectl` may take.
const CTL_WITHIN: Duration = Duration::from_secs(30);

/// How long a role may take to exit after SIGTERM before it is killed.
const TERM_WITHIN: Duration = Duration::from_secs(10);

/// Training iterations of exported version `v`: each version a different model.
pub fn training_iterations(version: u32) -> u32 {
    100u32.saturating_add(version.saturating_sub(1).saturating_mul(50))
}

/// Where the soak keeps its files.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The soak directory (absolute).
    pub dir: PathBuf,
}

impl Layout {
    /// Exported versions, kept between runs: `exports/mnist/<v>/`.
    pub fn exports(&self) -> PathBuf {
        self.dir.join("exports").join(MODEL)
    }
    /// The directory discovery watches (the model's base path), emptied at each start.
    pub fn watched(&self) -> PathBuf {
        self.dir.join("watched").join(MODEL)
    }
    /// Where a version is copied before it is renamed into the watched directory.
    fn staging(&self) -> PathBuf {
        self.dir.join("staging")
    }
    /// The roles' logs.
    pub fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

/// Exports versions `1..=last` of the model with `mnist-export` (a different number of
/// training iterations each) unless they are already there.
pub fn export_versions(
    bin_dir: &Path,
    layout: &Layout,
    last: u32,
    data: Option<&Path>,
) -> Result<()> {
    let exports = layout.exports();
    for v in 1..=last {
        if exports.join(v.to_string()).join("model.pt").is_file() {
            continue;
        }
        let mut command = Command::new(bin_dir.join("mnist-export"));
        command
            .arg(format!("--training-iteration={}", training_iterations(v)))
            .arg(format!("--model-version={v}"));
        if let Some(data) = data {
            command.arg(format!("--data={}", data.display()));
        }
        let output = command
            .arg(&exports)
            .stdin(Stdio::null())
            .output()
            .map_err(io(format!(
                "running {} (--bin-dir)",
                bin_dir.join("mnist-export").display()
            )))?;
        if !output.status.success() {
            return Err(Error::Stack(format!(
                "mnist-export of version {v} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// Copies exported version `v` into the watched directory: into a staging directory
/// first, then renamed in, so discovery never sees half a version.
pub fn deliver(layout: &Layout, v: u32) -> Result<()> {
    let from = layout.exports().join(v.to_string());
    let staged = layout.staging().join(v.to_string());
    let to = layout.watched().join(v.to_string());
    if staged.exists() {
        std::fs::remove_dir_all(&staged).map_err(io(format!("removing {}", staged.display())))?;
    }
    std::fs::create_dir_all(&staged).map_err(io(format!("creating {}", staged.display())))?;
    let entries = std::fs::read_dir(&from).map_err(io(format!("reading {}", from.display())))?;
    for entry in entries {
        let entry = entry.map_err(io(format!("reading {}", from.display())))?;
        let target = staged.join(entry.file_name());
        std::fs::copy(entry.path(), &target).map_err(io(format!(
            "copying {} to {}",
            entry.path().display(),
            target.display()
        )))?;
    }
    std::fs::rename(&staged, &to).map_err(io(format!(
        "renaming {} to {}",
        staged.display(),
        to.display()
    )))
}

/// A free loopback port (the listener is closed before the role binds it).
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free loopback port"))?;
    Ok(listener
        .local_addr()
        .map_err(io("finding a free loopback port"))?
        .port())
}

/// One role process, restartable with the same command line.
#[derive(Debug)]
struct Role {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    /// The address it listens on, waited for after each start.
    listen: Option<String>,
    child: Option<Child>,
    started: Instant,
    /// Set when the soak killed it on purpose (not an unexpected exit).
    killed_on_purpose: bool,
    /// The exit already reported by [`Stack::unexpected_exits`].
    exit_reported: bool,
}

impl Role {
    fn spawn(&mut self) -> Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(io(format!("opening {}", self.log.display())))?;
        let log_err = log
            .try_clone()
            .map_err(io(format!("opening {}", self.log.display())))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io(format!(
                "starting {} (is --bin-dir right? build it with cargo build --release --workspace --bins)",
                self.program.display()
            )))?;
        self.child = Some(child);
        self.started = Instant::now();
        self.killed_on_purpose = false;
        self.exit_reported = false;
        if let Some(addr) = self.listen.clone() {
            self.wait_listening(&addr)?;
        }
        Ok(())
    }

    fn wait_listening(&mut self, addr: &str) -> Result<()> {
        let deadline = Instant::now() + LISTEN_WITHIN;
        while TcpStream::connect(addr).is_err() {
            if let Some(status) = self.try_exit() {
                return Err(Error::Stack(format!(
                    "{} exited with {status} before it listened on {addr}; see {}",
                    self.name,
                    self.log.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Stack(format!(
                    "{} did not listen on {addr} within {} s; see {}",
                    self.name,
                    LISTEN_WITHIN.as_secs(),
                    self.log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`TERM_WITHIN`].
    fn terminate(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + TERM_WITHIN;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

/// What [`Stack::start`] needs.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Where the binaries are.
    pub bin_dir: PathBuf,
    /// Where the files go.
    pub layout: Layout,
    /// `--lease-ttl` of every role, seconds.
    pub lease_ttl_secs: u64,
}

/// A process of the stack, as the memory readings name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessView {
    /// `etcd`, `discovery`, `worker-1`, `worker-2`, `router`.
    pub name: String,
    /// Its pid, while it runs.
    pub pid: Option<u32>,
    /// When its current incarnation started.
    pub started: Instant,
}

/// The running stack; everything it started is stopped when it is dropped.
#[derive(Debug)]
pub struct Stack {
    config: StackConfig,
    etcd: EtcdServer,
    etcd_started: Instant,
    /// discovery, worker-1, worker-2, router.
    roles: Vec<Role>,
    router_addr: String,
}

/// Index of the worker the soak kills and starts again.
const KILLED_WORKER: usize = 2;

impl Stack {
    /// Empties the watched directory, delivers version 1, and starts etcd, discovery,
    /// two workers and the router, each listening before the next starts.
    pub fn start(config: StackConfig) -> Result<Self> {
        let layout = &config.layout;
        for dir in [layout.watched(), layout.staging()] {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))?;
            }
        }
        for dir in [layout.watched(), layout.staging(), layout.logs()] {
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        deliver(layout, 1)?;
        let etcd = EtcdServer::start().map_err(Error::Stack)?;
        let etcd_started = Instant::now();
        let common = vec![
            format!("--etcd-endpoints={}", etcd.endpoint()),
            format!("--prefix={PREFIX}"),
            format!("--lease-ttl={}", config.lease_ttl_secs),
        ];
        let role = |name: &str, program: &str, args: Vec<String>, listen: Option<String>| Role {
            name: name.to_string(),
            program: config.bin_dir.join(program),
            args: [common.clone(), args].concat(),
            log: layout.logs().join(format!("{name}.log")),
            listen,
            child: None,
            started: Instant::now(),
            killed_on_purpose: false,
            exit_reported: false,
        };
        let mut roles = vec![role(
            "discovery",
            "aspire-discovery",
            vec![
                format!("--model_name={MODEL}"),
                format!("--model_base_path={}", layout.watched().display()),
            ],
            None,
        )];
        for i in 1..=2 {
            let port = free_port()?;
            roles.push(role(
                &format!("worker-{i}"),
                "aspire-worker",
                vec![
                    "--host=127.0.0.1".to_string(),
                    format!("--port={port}"),
                    format!("--worker-id=soak-worker-{i}"),
                    format!("--storage-root={}", layout.watched().display()),
                    "--metrics-port=0".to_string(),
                    "--enable_batching".to_string(),
                ],
                Some(format!("127.0.0.1:{port}")),
            ));
        }
        let router_port = free_port()?;
        let router_addr = format!("127.0.0.1:{router_port}");
        roles.push(role(
            "router",
            "aspire-router",
            vec![
                "--host=127.0.0.1".to_string(),
                format!("--port={router_port}"),
                "--metrics-port=0".to_string(),
            ],
            Some(router_addr.clone()),
        ));
        let mut stack = Self {
            config,
            etcd,
            etcd_started,
            roles,
            router_addr,
        };
        for role in &mut stack.roles {
            role.spawn()?;
        }
        Ok(stack)
    }

    /// Where the router listens, `127.0.0.1:PORT`.
    pub fn router_addr(&self) -> &str {
        &self.router_addr
    }

    /// Every process, etcd first.
    pub fn processes(&self) -> Vec<ProcessView> {
        let mut out = vec![ProcessView {
            name: "etcd".to_string(),
            pid: self.etcd.pid(),
            started: self.etcd_started,
        }];
        out.extend(self.roles.iter().map(|r| ProcessView {
            name: r.name.clone(),
            pid: r.pid(),
            started: r.started,
        }));
        out
    }

    /// Roles that exited without the soak killing them, each reported once, with the
    /// exit status and the log to read.
    pub fn unexpected_exits(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for role in &mut self.roles {
            if role.killed_on_purpose || role.exit_reported {
                continue;
            }
            if let Some(status) = role.try_exit() {
                role.exit_reported = true;
                out.push(format!(
                    "{} exited on its own with {status}; see {}",
                    role.name,
                    role.log.display()
                ));
            }
        }
        out
    }

    /// Copies version `v` into the watched directory.
    pub fn new_version(&self, v: u32) -> Result<()> {
        deliver(&self.config.layout, v)
    }

    /// Kills etcd and starts it again on the same ports and data.
    pub fn restart_etcd(&mut self) -> Result<()> {
        self.etcd.restart().map_err(Error::Stack)?;
        self.etcd_started = Instant::now();
        Ok(())
    }

    /// SIGSTOPs etcd.
    pub fn freeze_etcd(&self) -> Result<()> {
        self.etcd.freeze().map_err(Error::Stack)
    }

    /// SIGCONTs etcd.
    pub fn thaw_etcd(&self) -> Result<()> {
        self.etcd.thaw().map_err(Error::Stack)
    }

    /// SIGKILLs worker-2.
    pub fn kill_worker(&mut self) -> Result<u32> {
        let role = &mut self.roles[KILLED_WORKER];
        let pid = role
            .pid()
            .ok_or_else(|| Error::Stack(format!("{} is not running", role.name)))?;
        role.killed_on_purpose = true;
        role.kill();
        Ok(pid)
    }

    /// Starts worker-2 again with the same flags and waits until it listens.
    pub fn start_worker(&mut self) -> Result<u32> {
        let role = &mut self.roles[KILLED_WORKER];
        role.kill();
        role.spawn()?;
        role.pid()
            .ok_or_else(|| Error::Stack(format!("{} did not start", role.name)))
    }

    /// `aspirectl pin mnist <v>`.
    pub fn pin(&self, v: u32) -> Result<String> {
        self.aspirectl(&["pin", MODEL, &v.to_string()])
    }

    /// `aspirectl unpin mnist`.
    pub fn unpin(&self) -> Result<String> {
        self.aspirectl(&["unpin", MODEL])
    }

    fn aspirectl(&self, args: &[&str]) -> Result<String> {
        let program = self.config.bin_dir.join("aspirectl");
        let mut child = Command::new(&program)
            .arg(format!("--etcd-endpoints={}", self.etcd.endpoint()))
            .arg(format!("--prefix={PREFIX}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("starting {}", program.display())))?;
        let deadline = Instant::now() + CTL_WITHIN;
        loop {
            if let Some(status) = child.try_wait().map_err(io("waiting for aspirectl"))? {
                let output = child
                    .wait_with_output()
                    .map_err(io("reading aspirectl's output"))?;
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout).trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
                return if status.success() {
                    Ok(text)
                } else {
                    Err(Error::Stack(format!(
                        "aspirectl {} failed ({status}): {text}",
                        args.join(" ")
                    )))
                };
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Stack(format!(
                    "aspirectl {} did not finish within {} s",
                    args.join(" "),
                    CTL_WITHIN.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the roles (router first, SIGTERM then SIGKILL), then etcd (thawed first, in
    /// case the run ended while it was frozen).
    pub fn shutdown(&mut self) {
        for role in self.roles.iter_mut().rev() {
            role.terminate();
        }
        let _ = self.etcd.thaw();
        self.etcd.stop();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for role in self.roles.iter_mut().rev() {
            role.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_version_is_a_different_model() {
        assert_eq!(training_iterations(1), 100);
        assert_eq!(training_iterations(2), 150);
        assert_eq!(training_iterations(21), 1100);
        assert_eq!(training_iterations(0), 100);
    }

    #[test]
    fn a_delivered_version_appears_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout {
            dir: tmp.path().to_path_buf(),
        };
        let exported = layout.exports().join("3");
        std::fs::create_dir_all(&exported).unwrap();
        std::fs::write(exported.join("model.pt"), b"weights").unwrap();
        std::fs::write(exported.join("signature.json"), b"{}").unwrap();
        std::fs::create_dir_all(layout.watched()).unwrap();
        deliver(&layout, 3).unwrap();
        let copied = layout.watched().join("3");
        assert_eq!(std::fs::read(copied.join("model.pt")).unwrap(), b"weights");
        assert_eq!(std::fs::read(copied.join("signature.json")).unwrap(), b"{}");
        // Nothing left in staging.
        assert!(!layout.staging().join("3").exists());
        // A version never exported is an error that names the directory.
        let err = deliver(&layout, 4).unwrap_err().to_string();
        assert!(err.contains("exports"), "{err}");
    }
}
