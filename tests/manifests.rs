//! The Kubernetes manifests in `deploy/`, checked as far as they can be without a cluster.
//!
//! `scripts/check_manifests.sh` renders every overlay with `kubectl kustomize`, validates
//! each object strictly against Kubernetes 1.30's schemas and writes it as JSON; these
//! tests run it once, read the JSON and check what a schema cannot see:
//! - each container that runs an Aspire binary gets a command line that binary accepts:
//!   `command` + `args` with `$(VAR)` expanded as the kubelet does, plus the `ASPIRE_*`
//!   variables it is given (env, envFrom ConfigMaps), parsed by the binary's own clap
//!   definition and then its own validation; an `ASPIRE_*` variable no flag reads, or a
//!   `$(VAR)` the container does not define, is an error;
//! - the GPU overlay's workers ask for a GPU and run on CUDA; the dev overlay has one CPU
//!   worker;
//! - every container has CPU and memory requests and limits; workers and routers have
//!   probes on their gRPC port; shutdown fits in the grace period;
//! - workers advertise their pod IP and are named after their pod; every service talks to
//!   the same etcd, the bundled one or none of it; the model config parses with the real
//!   parser and its paths are mounted alike in discovery and workers;
//! - no Secret values are written in the manifests; labels and selectors agree;
//! - TLS: every certificate file a flag names is on a Secret volume; servers with TLS
//!   are probed with tcpSocket (the kubelet's grpc: probes speak plaintext only); when
//!   workers serve TLS every router dials them with TLS, by a fixed server name (pod IPs
//!   cannot be in a certificate made in advance).
//!
//! The `negative_*` tests feed broken fragments through the same functions, so that each
//! of these checks is known to fail when it should.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use aspire_discovery::ModelConfig;
use aspire_discovery::service::DiscoveryCli;
use aspire_router::RouterConfig;
use aspire_worker::app::{DEREGISTER_GRACE, UNLOAD_GRACE, WorkerCli};
use aspire_worker::model::DeviceSpec;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use serde_json::{Value, json};

/// What the Downward API would give a pod; placeholders for values known only at run time.
const POD_IP: &str = "10.1.2.3";
const NAMESPACE: &str = "aspire";
/// The image every Aspire container runs (the GPU overlay's adds `-cuda`).
const IMAGE: &str = "aspire:0.1.0";
/// How long a draining worker waits for etcd to drop its record (`VersionManager::deregister`).
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a request in flight gets to finish during a drain, on top of the rest.
const IN_FLIGHT_MARGIN: Duration = Duration::from_secs(10);
/// The health service names workers and routers report.
const HEALTH_SERVICES: [&str; 2] = ["", "tensorflow.serving.PredictionService"];

// ---------------------------------------------------------------------------------------
// Rendering: scripts/check_manifests.sh, once per test process.

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// Runs `scripts/check_manifests.sh` (render, validate, write JSON) once; its output folder.
fn rendered_dir() -> &'static Path {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = DIR.get_or_init(|| {
        let root = repo_root();
        let out = root.join("target").join("manifests");
        let output = Command::new("bash")
            .arg(root.join("scripts/check_manifests.sh"))
            .arg("--out")
            .arg(&out)
            .current_dir(&root)
            .output()
            .map_err(|e| format!("cannot run scripts/check_manifests.sh: {e}"))?;
        if output.status.success() {
            Ok(out)
        } else {
            Err(format!(
                "scripts/check_manifests.sh failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    });
    match result {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    }
}

/// One rendered set of objects: an overlay, or `tools` (deploy/tools/*.yaml).
struct Manifest {
    name: String,
    objects: Vec<Value>,
}

impl Manifest {
    fn load(name: &str) -> Self {
        let path = rendered_dir().join(format!("{name}.json"));
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let objects = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not a JSON list of objects: {e}", path.display()));
        Self {
            name: name.to_string(),
            objects,
        }
    }

    fn from_objects(name: &str, objects: Vec<Value>) -> Self {
        Self {
            name: name.to_string(),
            objects,
        }
    }

    fn find(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .filter(|o| o["kind"] == kind)
            .find(|o| o["metadata"]["name"] == name)
    }

    /// Each ConfigMap's data, by name.
    fn config_maps(&self) -> BTreeMap<&str, BTreeMap<String, String>> {
        self.objects
            .iter()
            .filter(|o| o["kind"] == "ConfigMap")
            .map(|o| {
                let data = o["data"]
                    .as_object()
                    .map(|d| {
                        d.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                (o["metadata"]["name"].as_str().unwrap_or_default(), data)
            })
            .collect()
    }

    /// Everything that runs pods, with its pod spec.
    fn workloads(&self) -> Vec<Workload<'_>> {
        self.objects
            .iter()
            .filter_map(|o| {
                let kind = o["kind"].as_str()?;
                let (template, pod) = match kind {
                    "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                        (&o["spec"]["template"], &o["spec"]["template"]["spec"])
                    }
                    "CronJob" => (
                        &o["spec"]["jobTemplate"]["spec"]["template"],
                        &o["spec"]["jobTemplate"]["spec"]["template"]["spec"],
                    ),
                    "Pod" => (o, &o["spec"]),
                    _ => return None,
                };
                Some(Workload {
                    manifest: &self.name,
                    kind,
                    name: o["metadata"]["name"].as_str()?,
                    object: o,
                    labels: &template["metadata"]["labels"],
                    pod,
                })
            })
            .collect()
    }
}

/// The overlays the script rendered: every directory in deploy/overlays.
fn overlay_names() -> Vec<String> {
    let dir = repo_root().join("deploy/overlays");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("kustomization.yaml").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Every rendered overlay, and deploy/tools.
fn all_manifests() -> Vec<Manifest> {
    let mut names = overlay_names();
    names.push("tools".to_string());
    names.iter().map(|n| Manifest::load(n)).collect()
}

/// Runs a check over every manifest; fails naming every problem found.
fn assert_no_problems(check: impl Fn(&Manifest) -> Vec<String>) {
    let problems: Vec<String> = all_manifests().iter().flat_map(check).collect();
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

/// A pod template (or a bare Pod) and where it comes from.
struct Workload<'a> {
    manifest: &'a str,
    kind: &'a str,
    name: &'a str,
    object: &'a Value,
    labels: &'a Value,
    pod: &'a Value,
}

impl Workload<'_> {
    /// Containers and init containers.
    fn containers(&self) -> impl Iterator<Item = &Value> {
        ["initContainers", "containers"]
            .into_iter()
            .flat_map(|key| self.pod[key].as_array().into_iter().flatten())
    }

    fn place(&self, container: &Value) -> String {
        format!(
            "{}: {}/{} container {}",
            self.manifest,
            self.kind,
            self.name,
            container["name"].as_str().unwrap_or("?")
        )
    }

    /// What `metadata.name` is in one of its pods.
    fn pod_name(&self) -> String {
        match self.kind {
            "Pod" => self.name.to_string(),
            "StatefulSet" => format!("{}-0", self.name),
            "Deployment" => format!("{}-5d9c7b7f4-x2x7q", self.name),
            _ => format!("{}-x2x7q", self.name),
        }
    }

    fn replicas(&self) -> i64 {
        self.object["spec"]["replicas"].as_i64().unwrap_or(1)
    }

    fn volume(&self, name: &str) -> Option<&Value> {
        self.pod["volumes"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == name)
    }
}

// ---------------------------------------------------------------------------------------
// Command lines: what the kubelet would start, parsed by the binaries' own definitions.

/// The binaries in the image that take flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binary {
    Discovery,
    Worker,
    Router,
    Ctl,
}

impl Binary {
    fn of(command: &str) -> Option<Self> {
        match Path::new(command).file_name()?.to_str()? {
            "aspire-discovery" => Some(Self::Discovery),
            "aspire-worker" => Some(Self::Worker),
            "aspire-router" => Some(Self::Router),
            "aspirectl" => Some(Self::Ctl),
            _ => None,
        }
    }
}

/// A command line as one of the binaries parsed it.
#[derive(Debug)]
enum Parsed {
    Discovery(Box<DiscoveryCli>),
    Worker(Box<WorkerCli>),
    Router(Box<RouterConfig>),
    Ctl(Box<aspirectl::Cli>),
}

impl Parsed {
    fn etcd(&self) -> &aspire_registry::cli::EtcdArgs {
        match self {
            Self::Discovery(c) => &c.etcd,
            Self::Worker(c) => &c.etcd,
            Self::Router(c) => &c.etcd,
            Self::Ctl(c) => &c.etcd,
        }
    }

    /// The gRPC port it listens on, if it serves one.
    fn grpc_port(&self) -> Option<u16> {
        match self {
            Self::Worker(c) => Some(c.port),
            Self::Router(c) => Some(c.port),
            Self::Discovery(_) | Self::Ctl(_) => None,
        }
    }

    /// Whether its gRPC port serves TLS only (`--ssl-config-file`).
    fn serves_tls(&self) -> bool {
        match self {
            Self::Worker(c) => c.serving.ssl_config_file.is_some(),
            Self::Router(c) => c.ssl_config_file.is_some(),
            Self::Discovery(_) | Self::Ctl(_) => false,
        }
    }

    /// The certificate and key files its flags name, with the flag.
    fn tls_files(&self) -> Vec<(&'static str, &Path)> {
        let mut files = Vec::new();
        match self {
            Self::Worker(c) => {
                files.push(("--ssl-config-file", c.serving.ssl_config_file.as_deref()))
            }
            Self::Router(c) => files.extend([
                ("--ssl-config-file", c.ssl_config_file.as_deref()),
                ("--worker-tls-ca-file", c.worker_tls.ca_file.as_deref()),
                ("--worker-tls-cert-file", c.worker_tls.cert_file.as_deref()),
                ("--worker-tls-key-file", c.worker_tls.key_file.as_deref()),
            ]),
            Self::Discovery(_) | Self::Ctl(_) => {}
        }
        files
            .into_iter()
            .filter_map(|(flag, path)| Some((flag, path?)))
            .collect()
    }

    /// The port it serves Prometheus metrics on, if any (the flag, else its default).
    fn metrics_port(&self) -> Option<u16> {
        let (flag, default) = match self {
            Self::Worker(c) => (c.metrics_port, aspire_worker::app::DEFAULT_METRICS_PORT),
            Self::Router(c) => (c.metrics_port, aspire_router::config::DEFAULT_METRICS_PORT),
            Self::Discovery(_) | Self::Ctl(_) => return None,
        };
        match flag.unwrap_or(default) {
            0 => None,
            port => Some(port),
        }
    }
}

/// An Aspire container whose command line parsed.
struct Checked<'a> {
    place: String,
    workload: &'a Workload<'a>,
    container: &'a Value,
    argv: Vec<String>,
    parsed: Parsed,
}

/// Expands `$(VAR)` as the kubelet does (`$$` is a literal `$`), except that a reference to
/// a variable the container does not define is an error: the kubelet would pass it on
/// literally, which is never what a manifest means.
fn expand(text: &str, env: &BTreeMap<String, String>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        if let Some((name, tail)) = after.strip_prefix('(').and_then(|s| s.split_once(')')) {
            let value = env.get(name).ok_or_else(|| {
                format!("{text:?} refers to $({name}), which the container does not define")
            })?;
            out.push_str(value);
            rest = tail;
            continue;
        }
        out.push('$');
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// A container's environment as the kubelet builds it: envFrom first, then env in order
/// (whose values may refer to earlier variables). Secret values are unknown here and come
/// out as a placeholder; the Downward API's as the placeholders above.
fn environment(
    m: &Manifest,
    w: &Workload,
    container: &Value,
) -> Result<BTreeMap<String, String>, String> {
    let config_maps = m.config_maps();
    let mut env = BTreeMap::new();
    for source in container["envFrom"].as_array().into_iter().flatten() {
        let prefix = source["prefix"].as_str().unwrap_or_default();
        if let Some(name) = source["configMapRef"]["name"].as_str() {
            match config_maps.get(name) {
                Some(data) => {
                    for (k, v) in data {
                        env.insert(format!("{prefix}{k}"), v.clone());
                    }
                }
                None if source["configMapRef"]["optional"] == true => {}
                None => return Err(format!("envFrom names ConfigMap {name}, which is not here")),
            }
        }
    }
    for var in container["env"].as_array().into_iter().flatten() {
        let name = var["name"].as_str().ok_or("an env entry has no name")?;
        let from = &var["valueFrom"];
        let value = if let Some(v) = var["value"].as_str() {
            expand(v, &env)?
        } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
            match path {
                "metadata.name" => w.pod_name(),
                "metadata.namespace" => NAMESPACE.to_string(),
                "status.podIP" => POD_IP.to_string(),
                "status.hostIP" => "10.0.0.1".to_string(),
                "spec.nodeName" => "node-1".to_string(),
                "spec.serviceAccountName" => "default".to_string(),
                other => return Err(format!("env {name}: no placeholder for fieldRef {other}")),
            }
        } else if from["resourceFieldRef"].is_object() {
            "1".to_string()
        } else if let Some(cm) = from["configMapKeyRef"]["name"].as_str() {
            let key = from["configMapKeyRef"]["key"].as_str().unwrap_or_default();
            match config_maps.get(cm).and_then(|d| d.get(key)) {
                Some(v) => v.clone(),
                None if from["configMapKeyRef"]["optional"] == true => continue,
                None => return Err(format!("env {name}: ConfigMap {cm} has no key {key}")),
            }
        } else if from["secretKeyRef"].is_object() {
            "<from a Secret>".to_string()
        } else {
            String::new()
        };
        env.insert(name.to_string(), value);
    }
    Ok(env)
}

/// Parses `argv` with `T`'s real clap definition, with the container's `env` in place of
/// this process's: the environment fallbacks are switched off (so a developer's own
/// `ASPIRE_*` variables change nothing) and each `ASPIRE_*` variable of the container
/// becomes the flag that reads it, unless the command line gives that flag (as clap does).
fn parse_with<T: CommandFactory + FromArgMatches>(
    argv: &[String],
    env: &BTreeMap<String, String>,
) -> Result<T, String> {
    let real = T::command();
    let isolated = || T::command().mut_args(|a| a.env(None::<&'static str>));
    let render = |e: clap::Error| e.render().to_string().trim().to_string();
    let given = isolated().try_get_matches_from(argv).map_err(render)?;
    let mut full = argv.to_vec();
    for (key, value) in env.iter().filter(|(k, _)| k.starts_with("ASPIRE_")) {
        let arg = real
            .get_arguments()
            .find(|a| a.get_env() == Some(OsStr::new(key)))
            .ok_or_else(|| {
                format!(
                    "environment variable {key} is read by no flag of {}",
                    real.get_name()
                )
            })?;
        let long = arg
            .get_long()
            .ok_or_else(|| format!("{key}: its flag has no long name"))?;
        if given.value_source(arg.get_id().as_str()) != Some(ValueSource::CommandLine) {
            // Right after the program name: top-level flags go before any subcommand.
            full.insert(1, format!("--{long}={value}"));
        }
    }
    let matches = isolated().try_get_matches_from(&full).map_err(render)?;
    T::from_arg_matches(&matches).map_err(render)
}

/// The file at `path` inside a container, when a ConfigMap volume provides it.
fn file_in_container(
    m: &Manifest,
    w: &Workload,
    container: &Value,
    path: &Path,
) -> Result<String, String> {
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|vm| {
            vm["mountPath"]
                .as_str()
                .is_some_and(|p| path.starts_with(p))
        })
        .max_by_key(|vm| vm["mountPath"].as_str().map_or(0, str::len))
        .ok_or_else(|| format!("{} is on no volume of the container", path.display()))?;
    let relative = path
        .strip_prefix(mount["mountPath"].as_str().unwrap_or_default())
        .map_err(|e| e.to_string())?
        .to_string_lossy()
        .into_owned();
    let volume = w
        .volume(mount["name"].as_str().unwrap_or_default())
        .ok_or_else(|| format!("volume {} is not in the pod", mount["name"]))?;
    let cm = volume["configMap"]["name"]
        .as_str()
        .ok_or_else(|| format!("{} is not in a ConfigMap volume", path.display()))?;
    let key = volume["configMap"]["items"]
        .as_array()
        .and_then(|items| items.iter().find(|i| i["path"] == relative.as_str()))
        .and_then(|i| i["key"].as_str())
        .unwrap_or(relative.as_str())
        .to_string();
    m.config_maps()
        .get(cm)
        .and_then(|d| d.get(&key).cloned())
        .ok_or_else(|| format!("ConfigMap {cm} has no key {key} (for {})", path.display()))
}

/// The models a discovery container serves: its config file (read from the ConfigMap it
/// is mounted from) parsed by the real parser, or its one --model_base_path.
fn discovery_models(
    m: &Manifest,
    w: &Workload,
    container: &Value,
    cli: &DiscoveryCli,
) -> Result<Vec<ModelConfig>, String> {
    match &cli.models.model_config_file {
        Some(path) => {
            let text = file_in_container(m, w, container, path)?;
            aspire_discovery::parse_model_config_file(&text)
                .map_err(|e| format!("--model_config_file {}: {e}", path.display()))
        }
        None => cli.models.models(),
    }
}

/// Builds and parses one container's command line; `Ok(None)` for containers that run
/// something else. The error names the container.
fn check_container<'a>(
    m: &Manifest,
    w: &'a Workload<'a>,
    container: &'a Value,
) -> Result<Option<Checked<'a>>, String> {
    let place = w.place(container);
    let command: Vec<&str> = container["command"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let Some(binary) = command.first().and_then(|c| Binary::of(c)) else {
        return Ok(None);
    };
    let at = |e: String| format!("{place}: {e}");
    let env = environment(m, w, container).map_err(at)?;
    let args = container["args"].as_array().into_iter().flatten();
    let argv: Vec<String> = command
        .iter()
        .map(|s| Value::from(*s))
        .chain(args.cloned())
        .map(|v| {
            v.as_str()
                .ok_or_else(|| format!("an argument is not a string: {v}"))
                .and_then(|s| expand(s, &env))
        })
        .collect::<Result<_, _>>()
        .map_err(at)?;
    let at_argv = |e: String| {
        format!(
            "{place}: {} rejected `{}`:\n{e}",
            command[0],
            argv.join(" ")
        )
    };
    let parsed = match binary {
        Binary::Discovery => {
            let cli: DiscoveryCli = parse_with(&argv, &env).map_err(at_argv)?;
            discovery_models(m, w, container, &cli).map_err(at)?;
            Parsed::Discovery(Box::new(cli))
        }
        Binary::Worker => {
            let cli: WorkerCli = parse_with(&argv, &env).map_err(at_argv)?;
            let listen: SocketAddr = format!("{}:{}", cli.host, cli.port)
                .parse()
                .map_err(|e| at(format!("--host/--port: {e}")))?;
            cli.settings(listen).map_err(|e| at(e.to_string()))?;
            cli.batching.resolve().map_err(at)?;
            Parsed::Worker(Box::new(cli))
        }
        Binary::Router => {
            let cli: RouterConfig = parse_with(&argv, &env).map_err(at_argv)?;
            cli.validate().map_err(at)?;
            Parsed::Router(Box::new(cli))
        }
        Binary::Ctl => Parsed::Ctl(Box::new(parse_with(&argv, &env).map_err(at_argv)?)),
    };
    Ok(Some(Checked {
        place,
        workload: w,
        container,
        argv,
        parsed,
    }))
}

/// Every Aspire container of a manifest's workloads, parsed; and every problem found.
fn check_containers<'a>(
    m: &Manifest,
    workloads: &'a [Workload<'a>],
) -> (Vec<Checked<'a>>, Vec<String>) {
    let mut checked = Vec::new();
    let mut problems = Vec::new();
    for w in workloads {
        for c in w.containers() {
            match check_container(m, w, c) {
                Ok(Some(ok)) => checked.push(ok),
                Ok(None) => {}
                Err(e) => problems.push(e),
            }
        }
    }
    (checked, problems)
}

fn command_line_problems(m: &Manifest) -> Vec<String> {
    let workloads = m.workloads();
    check_containers(m, &workloads).1
}

// ---------------------------------------------------------------------------------------
// The other checks, each a function from a manifest to its problems.

/// Every container asks for, and is limited in, CPU and memory.
fn resource_problems(m: &Manifest) -> Vec<String> {
    let mut problems = Vec::new();
    for w in m.workloads() {
        for c in w.containers() {
            for section in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    if c["resources"][section][resource].is_null() {
                        problems.push(format!("{}: no resources.{section}.{resource}", w.place(c)));
                    }
                }
            }
        }
    }
    problems
}

fn probe_port(probe: &Value) -> Option<(&'static str, u64)> {
    if let Some(p) = probe["grpc"]["port"].as_u64() {
        return Some(("grpc", p));
    }
    probe["tcpSocket"]["port"]
        .as_u64()
        .map(|p| ("tcpSocket", p))
}

/// Workers and routers: a gRPC readiness probe on the port they serve, asking for a health
/// service they report; a liveness probe on that port (gRPC for routers; workers see the
/// comment in deploy/base/worker.yaml); the port declared under that number. A port that
/// serves TLS gets tcpSocket probes instead: the kubelet's grpc: probes speak plaintext,
/// which a TLS server refuses, so they would never pass.
fn probe_problems(m: &Manifest) -> Vec<String> {
    let workloads = m.workloads();
    let (checked, _) = check_containers(m, &workloads);
    let mut problems = Vec::new();
    for c in &checked {
        let Some(port) = c.parsed.grpc_port().map(u64::from) else {
            continue;
        };
        let mut expect = |what: &str, probe: &Value, kinds: &[&str]| {
            match probe_port(probe) {
            Some((kind, p)) if kinds.contains(&kind) && p == port => {
                let service = probe["grpc"]["service"].as_str().unwrap_or_default();
                if !HEALTH_SERVICES.contains(&service) {
                    problems.push(format!("{}: {what} asks for health service {service:?}, which is never reported", c.place));
                }
            }
            other => problems.push(format!(
                "{}: {what} must be a {} probe on port {port} (the --port it serves); found {other:?}",
                c.place,
                kinds.join(" or ")
            )),
        }
        };
        let tls = c.parsed.serves_tls();
        let readiness: &[&str] = if tls { &["tcpSocket"] } else { &["grpc"] };
        expect("readinessProbe", &c.container["readinessProbe"], readiness);
        let liveness: &[&str] = match c.parsed {
            _ if tls => &["tcpSocket"],
            Parsed::Router(_) => &["grpc"],
            _ => &["grpc", "tcpSocket"],
        };
        expect("livenessProbe", &c.container["livenessProbe"], liveness);
        if !c.container["startupProbe"].is_null() {
            expect("startupProbe", &c.container["startupProbe"], readiness);
        }
        let declared = c.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["containerPort"].as_u64() == Some(port));
        if !declared {
            problems.push(format!("{}: containerPort {port} is not declared", c.place));
        }
    }
    problems
}

/// TLS files come from Secret volumes (a key in a ConfigMap is readable by anyone who may
/// read ConfigMaps), and both ends of the router→worker hop agree: workers that serve TLS
/// are dialled with TLS by every router, by a fixed server name since the address a worker
/// advertises is its pod IP.
fn tls_problems(m: &Manifest) -> Vec<String> {
    let workloads = m.workloads();
    let (checked, _) = check_containers(m, &workloads);
    let mut problems = Vec::new();
    for c in &checked {
        for (flag, path) in c.parsed.tls_files() {
            let mount = c.container["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|vm| {
                    vm["mountPath"]
                        .as_str()
                        .is_some_and(|p| path.starts_with(p))
                })
                .max_by_key(|vm| vm["mountPath"].as_str().map_or(0, str::len));
            let volume = mount.and_then(|vm| c.workload.volume(vm["name"].as_str()?));
            if volume.is_none_or(|v| v["secret"]["secretName"].as_str().is_none()) {
                problems.push(format!(
                    "{}: {flag} {} is not on a Secret volume",
                    c.place,
                    path.display()
                ));
            }
        }
    }
    let tls_workers = checked
        .iter()
        .filter(|c| matches!(c.parsed, Parsed::Worker(_)) && c.parsed.serves_tls())
        .count();
    for c in &checked {
        let Parsed::Router(router) = &c.parsed else {
            continue;
        };
        let dials_tls = router.worker_tls.ca_file.is_some();
        if tls_workers > 0 && !dials_tls {
            problems.push(format!(
                "{}: workers serve TLS but this router has no --worker-tls-ca-file: it could not reach them",
                c.place
            ));
        }
        if dials_tls && tls_workers == 0 {
            problems.push(format!(
                "{}: --worker-tls-ca-file is set but no worker serves TLS (--ssl-config-file)",
                c.place
            ));
        }
        if dials_tls && router.worker_tls.server_name.is_none() {
            problems.push(format!(
                "{}: workers advertise their pod IP, which no certificate made in advance carries; set --worker-tls-server-name",
                c.place
            ));
        }
    }
    problems
}

/// Where a worker or router serves metrics, the pod declares a port named `metrics`, and
/// the Prometheus annotations (when present) name that port.
fn metrics_problems(m: &Manifest) -> Vec<String> {
    let workloads = m.workloads();
    let (checked, _) = check_containers(m, &workloads);
    let mut problems = Vec::new();
    for c in &checked {
        let Some(port) = c.parsed.metrics_port() else {
            continue;
        };
        let declared = c.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == "metrics" && p["containerPort"].as_u64() == Some(port.into()));
        if !declared {
            problems.push(format!(
                "{}: serves metrics on {port} but declares no containerPort {port} named metrics",
                c.place
            ));
        }
        let annotations = match c.workload.kind {
            "Pod" => &c.workload.object["metadata"]["annotations"],
            _ => &c.workload.object["spec"]["template"]["metadata"]["annotations"],
        };
        if let Some(annotated) = annotations["prometheus.io/port"].as_str()
            && annotated != port.to_string()
        {
            problems.push(format!(
                "{}: prometheus.io/port is {annotated}, metrics are on {port}",
                c.place
            ));
        }
    }
    problems
}

/// No Secret carries values, and nothing that looks like a credential is written as a
/// literal: cloud credentials come from a Secret reference.
fn secret_problems(m: &Manifest) -> Vec<String> {
    let looks_secret = |name: &str| {
        let n = name.to_ascii_uppercase();
        ["AWS_", "GOOGLE_", "AZURE_"]
            .iter()
            .any(|p| n.starts_with(p))
            || ["SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "_KEY"]
                .iter()
                .any(|p| n.contains(p))
    };
    let mut problems = Vec::new();
    for o in &m.objects {
        let what = format!(
            "{}: {}/{}",
            m.name,
            o["kind"].as_str().unwrap_or("?"),
            o["metadata"]["name"].as_str().unwrap_or("?")
        );
        if o["kind"] == "Secret"
            && ["data", "stringData"]
                .iter()
                .any(|k| o[*k].as_object().is_some_and(|d| !d.is_empty()))
        {
            problems.push(format!(
                "{what}: a Secret with values; reference one created outside the manifests"
            ));
        }
        if o["kind"] == "ConfigMap" {
            for key in o["data"].as_object().into_iter().flatten().map(|(k, _)| k) {
                if looks_secret(key) {
                    problems.push(format!(
                        "{what}: key {key} looks like a credential; keep it in a Secret"
                    ));
                }
            }
        }
    }
    for w in m.workloads() {
        for c in w.containers() {
            for var in c["env"].as_array().into_iter().flatten() {
                let name = var["name"].as_str().unwrap_or_default();
                if looks_secret(name) && !var["value"].is_null() {
                    problems.push(format!(
                        "{}: env {name} is a literal; use valueFrom.secretKeyRef",
                        w.place(c)
                    ));
                }
            }
        }
    }
    problems
}

/// Discovery and workers read storage: they take the credentials Secret, optionally (no
/// Secret is needed for file:// models).
fn storage_credential_problems(m: &Manifest) -> Vec<String> {
    let workloads = m.workloads();
    let (checked, _) = check_containers(m, &workloads);
    checked
        .iter()
        .filter(|c| matches!(c.parsed, Parsed::Discovery(_) | Parsed::Worker(_)))
        .filter(|c| {
            !c.container["envFrom"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|s| {
                    s["secretRef"]["name"] == "aspire-storage-credentials"
                        && s["secretRef"]["optional"] == true
                })
        })
        .map(|c| {
            format!(
                "{}: no envFrom secretRef aspire-storage-credentials (optional: true)",
                c.place
            )
        })
        .collect()
}

/// Every Aspire container talks to the same etcd under the same prefix; when the manifest
/// bundles etcd (StatefulSet aspire-etcd), the endpoints are its members behind its headless
/// Service; when it does not, no endpoint names it.
fn etcd_problems(m: &Manifest) -> Vec<String> {
    let workloads = m.workloads();
    let (checked, _) = check_containers(m, &workloads);
    let mut problems = Vec::new();
    let settings: BTreeSet<(Vec<String>, String)> = checked
        .iter()
        .map(|c| {
            (
                c.parsed.etcd().etcd_endpoints.clone(),
                c.parsed.etcd().prefix.clone(),
            )
        })
        .collect();
    if settings.len() > 1 {
        problems.push(format!(
            "{}: Aspire containers disagree on etcd endpoints or prefix: {settings:?}",
            m.name
        ));
    }
    let bundled = m.find("StatefulSet", "aspire-etcd");
    let members: BTreeSet<String> = match bundled {
        Some(sts) => {
            let service = sts["spec"]["serviceName"].as_str().unwrap_or_default();
            match m.find("Service", service) {
                Some(svc) if svc["spec"]["clusterIP"] == "None" => {}
                _ => problems.push(format!("{}: StatefulSet aspire-etcd's serviceName {service:?} is no headless Service here", m.name)),
            }
            let replicas = sts["spec"]["replicas"].as_i64().unwrap_or(1);
            (0..replicas)
                .map(|i| format!("http://aspire-etcd-{i}.{service}:2379"))
                .collect()
        }
        None => BTreeSet::new(),
    };
    for c in &checked {
        for endpoint in &c.parsed.etcd().etcd_endpoints {
            let ok = match bundled {
                Some(_) => members.contains(endpoint),
                None => !endpoint.contains("aspire-etcd"),
            };
            if !ok {
                problems.push(format!(
                    "{}: etcd endpoint {endpoint} is not {}",
                    c.place,
                    if bundled.is_some() {
                        format!("a member of the bundled etcd ({members:?})")
                    } else {
                        "outside this manifest (the bundled etcd is not deployed)".to_string()
                    }
                ));
            }
        }
    }
    problems
}

/// The persistent volume a container sees `path` on, if any.
fn claim_for<'a>(w: &'a Workload, container: &Value, path: &str) -> Option<&'a str> {
    let mount = container["volumeMounts"]
        .as_array()?
        .iter()
        .filter(|vm| {
            vm["mountPath"]
                .as_str()
                .is_some_and(|p| Path::new(path).starts_with(p))
        })
        .max_by_key(|vm| vm["mountPath"].as_str().map_or(0, str::len))?;
    w.volume(mount["name"].as_str()?)?["persistentVolumeClaim"]["claimName"].as_str()
}

/// Discovery's models parse, and each local base path is on the same persistent volume,
/// at the same path, in discovery and in every worker (discovery publishes the location
/// workers copy from).
fn model_storage_problems(m: &Manifest) -> Vec<String> {
    let workloads = m.workloads();
    let (checked, _) = check_containers(m, &workloads);
    let mut problems = Vec::new();
    let workers: Vec<&Checked> = checked
        .iter()
        .filter(|c| matches!(c.parsed, Parsed::Worker(_)))
        .collect();
    for c in &checked {
        let Parsed::Discovery(cli) = &c.parsed else {
            continue;
        };
        let models = match discovery_models(m, c.workload, c.container, cli) {
            Ok(models) => models,
            Err(e) => {
                problems.push(format!("{}: {e}", c.place));
                continue;
            }
        };
        if models.is_empty() {
            problems.push(format!("{}: serves no model", c.place));
        }
        for model in models {
            // Workers load a version only from under their own --storage-root.
            let version = format!("{}/1", model.base_path.trim_end_matches('/'));
            for w in &workers {
                let Parsed::Worker(cli) = &w.parsed else {
                    continue;
                };
                let refused = match cli.storage.resolve() {
                    Ok(roots) => roots
                        .check_with(&version, |p| Ok(p.to_path_buf()))
                        .err()
                        .map(|e| e.to_string()),
                    Err(e) => Some(e),
                };
                if let Some(why) = refused {
                    problems.push(format!(
                        "{}: model {}'s versions ({version}) would be refused: {why}",
                        w.place, model.name
                    ));
                }
            }
            let path = model
                .base_path
                .strip_prefix("file://")
                .unwrap_or(&model.base_path);
            if !path.starts_with('/') {
                continue; // s3://, gs://, az://: credentials, not volumes
            }
            let Some(claim) = claim_for(c.workload, c.container, path) else {
                problems.push(format!(
                    "{}: model {} at {path} is on no persistent volume",
                    c.place, model.name
                ));
                continue;
            };
            for w in &workers {
                if claim_for(w.workload, w.container, path) != Some(claim) {
                    problems.push(format!(
                        "{}: model {} at {path} is not on volume claim {claim} as in discovery",
                        w.place, model.name
                    ));
                }
            }
        }
    }
    problems
}

/// Workers advertise `<pod IP>:<port>` and are named after their pod.
fn worker_identity_problems(m: &Manifest) -> Vec<String> {
    let workloads = m.workloads();
    let (checked, _) = check_containers(m, &workloads);
    let mut problems = Vec::new();
    for c in &checked {
        let Parsed::Worker(cli) = &c.parsed else {
            continue;
        };
        let want = format!("{POD_IP}:{}", cli.port);
        if cli.advertise_address.as_deref() != Some(want.as_str()) {
            problems.push(format!(
                "{}: advertises {:?}, not the pod IP and port (status.podIP:{})",
                c.place, cli.advertise_address, cli.port
            ));
        }
        if cli.worker_id.as_deref() != Some(c.workload.pod_name().as_str()) {
            problems.push(format!(
                "{}: worker id {:?} is not the pod name (metadata.name)",
                c.place, cli.worker_id
            ));
        }
    }
    problems
}

/// The grace period covers the drain: a preStop sleep plus in-flight requests, and for
/// workers deregistering, the deregister grace and unloading as well.
fn grace_problems(m: &Manifest) -> Vec<String> {
    let workloads = m.workloads();
    let (checked, _) = check_containers(m, &workloads);
    let mut problems = Vec::new();
    for c in &checked {
        let grace = Duration::from_secs(
            c.workload.pod["terminationGracePeriodSeconds"]
                .as_u64()
                .unwrap_or(30),
        );
        let pre_stop = c.container["lifecycle"]["preStop"]["exec"]["command"]
            .as_array()
            .filter(|cmd| cmd.first().and_then(Value::as_str) == Some("sleep"))
            .and_then(|cmd| cmd.get(1)?.as_str()?.parse().ok())
            .map_or(Duration::ZERO, Duration::from_secs);
        let drain = match c.parsed {
            Parsed::Worker(_) => DEREGISTER_TIMEOUT + DEREGISTER_GRACE + UNLOAD_GRACE,
            _ => Duration::ZERO,
        };
        let need = pre_stop + drain + IN_FLIGHT_MARGIN;
        if grace < need {
            problems.push(format!(
                "{}: terminationGracePeriodSeconds {grace:?} is shorter than the drain ({need:?})",
                c.place
            ));
        }
    }
    problems
}

/// Every object carries the three labels; pod templates too; selectors select the
/// template they sit beside; Services and PodDisruptionBudgets select some pods.
fn label_problems(m: &Manifest) -> Vec<String> {
    let required = [
        "app.kubernetes.io/name",
        "app.kubernetes.io/component",
        "app.kubernetes.io/part-of",
    ];
    let subset = |selector: &Value, labels: &Value| {
        selector
            .as_object()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
    };
    let mut problems = Vec::new();
    for o in &m.objects {
        let what = format!(
            "{}: {}/{}",
            m.name,
            o["kind"].as_str().unwrap_or("?"),
            o["metadata"]["name"].as_str().unwrap_or("?")
        );
        for label in required {
            if o["metadata"]["labels"][label].is_null() {
                problems.push(format!("{what}: no label {label}"));
            }
        }
        if o["metadata"]["labels"]["app.kubernetes.io/part-of"] != "aspire" {
            problems.push(format!("{what}: app.kubernetes.io/part-of is not aspire"));
        }
    }
    let workloads = m.workloads();
    for w in &workloads {
        for label in required {
            if w.labels[label].is_null() {
                problems.push(format!(
                    "{}: {}/{}: pod template has no label {label}",
                    m.name, w.kind, w.name
                ));
            }
        }
        let selector = &w.object["spec"]["selector"]["matchLabels"];
        if w.kind != "Pod" && !subset(selector, w.labels) {
            problems.push(format!(
                "{}: {}/{}: selector {selector} does not select its own pods",
                m.name, w.kind, w.name
            ));
        }
    }
    for o in m
        .objects
        .iter()
        .filter(|o| o["kind"] == "Service" || o["kind"] == "PodDisruptionBudget")
    {
        let selector = if o["kind"] == "Service" {
            &o["spec"]["selector"]
        } else {
            &o["spec"]["selector"]["matchLabels"]
        };
        if !workloads.iter().any(|w| subset(selector, w.labels)) {
            problems.push(format!(
                "{}: {}/{}: selector {selector} selects no pods here",
                m.name,
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            ));
        }
    }
    problems
}

/// Aspire containers run the one Aspire image (the GPU overlay's is its CUDA variant).
fn image_problems(m: &Manifest) -> Vec<String> {
    let workloads = m.workloads();
    let (checked, _) = check_containers(m, &workloads);
    checked
        .iter()
        .filter_map(|c| {
            let image = c.container["image"].as_str().unwrap_or_default();
            (image != IMAGE && image != format!("{IMAGE}-cuda"))
                .then(|| format!("{}: image {image:?}, not {IMAGE}", c.place))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The tests over the real manifests.

#[test]
fn every_overlay_renders_and_validates_with_every_service() {
    let names = overlay_names();
    for expected in ["dev", "gpu", "tls"] {
        assert!(
            names.iter().any(|n| n == expected),
            "no deploy/overlays/{expected}"
        );
    }
    for name in &names {
        let m = Manifest::load(name);
        let workloads = m.workloads();
        let (checked, _) = check_containers(&m, &workloads);
        for binary in ["aspire-discovery", "aspire-worker", "aspire-router"] {
            assert!(
                checked.iter().any(|c| c.argv[0] == binary),
                "overlay {name} runs no {binary}"
            );
        }
    }
}

#[test]
fn aspire_command_lines_parse_with_the_real_flag_definitions() {
    assert_no_problems(command_line_problems);
}

#[test]
fn every_container_has_cpu_and_memory_requests_and_limits() {
    assert_no_problems(resource_problems);
}

#[test]
fn workers_and_routers_are_probed_on_their_grpc_port() {
    assert_no_problems(probe_problems);
}

#[test]
fn tls_files_come_from_secrets_and_both_ends_agree() {
    assert_no_problems(tls_problems);
}

#[test]
fn tls_overlay_serves_tls_on_every_hop() {
    let m = Manifest::load("tls");
    let workloads = m.workloads();
    let (checked, problems) = check_containers(&m, &workloads);
    assert!(problems.is_empty(), "{problems:?}");
    let (mut workers, mut routers) = (0, 0);
    for c in &checked {
        match &c.parsed {
            Parsed::Worker(_) => {
                assert!(c.parsed.serves_tls(), "{}: no --ssl-config-file", c.place);
                workers += 1;
            }
            Parsed::Router(r) => {
                assert!(c.parsed.serves_tls(), "{}: no --ssl-config-file", c.place);
                let t = &r.worker_tls;
                assert!(
                    t.ca_file.is_some() && t.cert_file.is_some() && t.key_file.is_some(),
                    "{}: the router must dial workers with mTLS: {t:?}",
                    c.place
                );
                routers += 1;
            }
            _ => {}
        }
    }
    assert!(
        workers > 0 && routers > 0,
        "workers {workers}, routers {routers}"
    );
}

#[test]
fn metrics_ports_are_declared() {
    assert_no_problems(metrics_problems);
}

#[test]
fn no_secret_values_are_written_in_the_manifests() {
    assert_no_problems(secret_problems);
    assert_no_problems(storage_credential_problems);
}

#[test]
fn every_service_talks_to_one_etcd() {
    assert_no_problems(etcd_problems);
}

#[test]
fn the_model_config_parses_and_its_paths_are_mounted_alike() {
    assert_no_problems(model_storage_problems);
}

#[test]
fn workers_advertise_their_pod_ip_and_pod_name() {
    assert_no_problems(worker_identity_problems);
}

#[test]
fn shutdown_fits_in_the_grace_period() {
    assert_no_problems(grace_problems);
}

#[test]
fn labels_selectors_and_image_agree() {
    assert_no_problems(label_problems);
    assert_no_problems(image_problems);
}

/// The worker containers of one overlay, parsed.
fn workers_of(name: &str, each: impl Fn(&Checked, &WorkerCli)) {
    let m = Manifest::load(name);
    let workloads = m.workloads();
    let (checked, problems) = check_containers(&m, &workloads);
    assert!(problems.is_empty(), "{problems:?}");
    let mut seen = 0;
    for c in &checked {
        if let Parsed::Worker(cli) = &c.parsed {
            each(c, cli);
            seen += 1;
        }
    }
    assert!(seen > 0, "overlay {name} has no worker");
}

#[test]
fn gpu_overlay_workers_ask_for_a_gpu_and_run_on_cuda() {
    workers_of("gpu", |c, cli| {
        assert!(
            matches!(cli.runtime.device, DeviceSpec::Cuda(_)),
            "{}: --device is {:?}, not cuda (argv: {:?})",
            c.place,
            cli.runtime.device,
            c.argv
        );
        assert!(
            c.argv.iter().any(|a| a == "--device=cuda"),
            "{}: no --device=cuda",
            c.place
        );
        let gpus = &c.container["resources"]["limits"]["nvidia.com/gpu"];
        let count = gpus
            .as_u64()
            .or_else(|| gpus.as_str()?.parse().ok())
            .unwrap_or(0);
        assert!(count >= 1, "{}: limits nvidia.com/gpu is {gpus}", c.place);
        let tolerates = c.workload.pod["tolerations"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["key"] == "nvidia.com/gpu");
        assert!(tolerates, "{}: no toleration for nvidia.com/gpu", c.place);
        let image = c.container["image"].as_str().unwrap_or_default();
        assert_eq!(
            image,
            format!("{IMAGE}-cuda"),
            "{}: a CPU image cannot use the GPU",
            c.place
        );
    });
}

#[test]
fn dev_overlay_runs_exactly_one_cpu_worker() {
    workers_of("dev", |c, cli| {
        assert_eq!(c.workload.replicas(), 1, "{}: replicas", c.place);
        assert_eq!(cli.runtime.device, DeviceSpec::Cpu, "{}: --device", c.place);
        assert!(
            c.container["resources"]["limits"]["nvidia.com/gpu"].is_null(),
            "{}",
            c.place
        );
        assert_eq!(c.container["image"], IMAGE, "{}", c.place);
    });
}

// ---------------------------------------------------------------------------------------
// The same checks, fed broken fragments: each must fail.

/// A Deployment running `command` with `args` and `env`, with the ConfigMap, volumes
/// and probes the real ones have.
fn fragment(command: &str, args: &[&str], env: Value) -> Manifest {
    let labels = json!({
        "app.kubernetes.io/name": "aspire-worker",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/part-of": "aspire",
    });
    let config = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "aspire-config-abc", "labels": labels},
        "data": {"ASPIRE_ETCD_ENDPOINTS": "http://etcd.example:2379"},
    });
    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "aspire-worker", "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{
                        "name": "worker",
                        "image": IMAGE,
                        "command": [command],
                        "args": args,
                        "env": env,
                        "envFrom": [
                            {"configMapRef": {"name": "aspire-config-abc"}},
                            {"secretRef": {"name": "aspire-storage-credentials", "optional": true}},
                        ],
                        "ports": [
                            {"name": "grpc", "containerPort": 8501},
                            {"name": "metrics", "containerPort": 9501},
                        ],
                        "readinessProbe": {"grpc": {"port": 8501}},
                        "livenessProbe": {"tcpSocket": {"port": 8501}},
                        "resources": {
                            "requests": {"cpu": "1", "memory": "1Gi"},
                            "limits": {"cpu": "1", "memory": "1Gi"},
                        },
                    }],
                },
            },
        },
    });
    Manifest::from_objects("fragment", vec![config, deployment])
}

fn worker_env() -> Value {
    json!([
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ])
}

const GOOD_WORKER_ARGS: [&str; 4] = [
    "--port=8501",
    "--advertise-address=$(POD_IP):8501",
    "--worker-id=$(POD_NAME)",
    "--storage-root=/models",
];

fn all_problems(m: &Manifest) -> Vec<String> {
    [
        command_line_problems,
        resource_problems,
        probe_problems,
        tls_problems,
        metrics_problems,
        secret_problems,
        storage_credential_problems,
        etcd_problems,
        worker_identity_problems,
        grace_problems,
        label_problems,
        image_problems,
    ]
    .iter()
    .flat_map(|check| check(m))
    .collect()
}

/// Asserts that `m` has a problem containing every one of `needles`.
fn assert_problem(m: &Manifest, needles: &[&str]) {
    let problems = all_problems(m);
    assert!(
        problems
            .iter()
            .any(|p| needles.iter().all(|n| p.contains(n))),
        "expected a problem mentioning {needles:?}; got {problems:#?}"
    );
}

#[test]
fn negative_the_fragment_itself_passes() {
    let m = fragment("aspire-worker", &GOOD_WORKER_ARGS, worker_env());
    assert_eq!(all_problems(&m), Vec::<String>::new());
}

#[test]
fn negative_a_worker_without_a_storage_root_fails() {
    let args: Vec<&str> = GOOD_WORKER_ARGS
        .into_iter()
        .filter(|a| !a.starts_with("--storage-root"))
        .collect();
    let m = fragment("aspire-worker", &args, worker_env());
    assert_problem(
        &m,
        &[
            "fragment: Deployment/aspire-worker container worker",
            "no --storage-root given",
        ],
    );
}

#[test]
fn negative_an_unknown_flag_fails_naming_the_container() {
    let mut args = GOOD_WORKER_ARGS.to_vec();
    args.push("--no-such-flag");
    let m = fragment("aspire-worker", &args, worker_env());
    assert_problem(
        &m,
        &[
            "fragment: Deployment/aspire-worker container worker",
            "--no-such-flag",
        ],
    );
    // Each binary's own definition: a worker flag is unknown to the router.
    let m = fragment("aspire-router", &["--port=8501", "--device=cpu"], json!([]));
    assert_problem(&m, &["aspire-router rejected", "--device"]);
}

#[test]
fn negative_a_bad_value_fails() {
    let mut args = GOOD_WORKER_ARGS.to_vec();
    args.push("--device=tpu");
    let m = fragment("aspire-worker", &args, worker_env());
    assert_problem(&m, &["container worker", "tpu"]);
}

#[test]
fn negative_an_environment_variable_no_flag_reads_fails() {
    let mut env = worker_env();
    env.as_array_mut()
        .expect("a list")
        .push(json!({"name": "ASPIRE_DEVCE", "value": "cuda"}));
    let m = fragment("aspire-worker", &GOOD_WORKER_ARGS, env);
    assert_problem(&m, &["ASPIRE_DEVCE is read by no flag of aspire-worker"]);
}

#[test]
fn negative_environment_values_are_parsed_too() {
    let mut env = worker_env();
    env.as_array_mut()
        .expect("a list")
        .push(json!({"name": "ASPIRE_MAX_BATCH_SIZE", "value": "many"}));
    let m = fragment("aspire-worker", &GOOD_WORKER_ARGS, env);
    assert_problem(&m, &["container worker", "many"]);
}

#[test]
fn negative_an_undefined_variable_reference_fails() {
    let args = [
        "--port=8501",
        "--advertise-address=$(POD_IPP):8501",
        "--worker-id=$(POD_NAME)",
    ];
    let m = fragment("aspire-worker", &args, worker_env());
    assert_problem(&m, &["$(POD_IPP)"]);
}

#[test]
fn negative_a_worker_not_advertising_its_pod_ip_fails() {
    let args = [
        "--port=8501",
        "--worker-id=$(POD_NAME)",
        "--storage-root=/models",
    ];
    let m = fragment("aspire-worker", &args, worker_env());
    assert_problem(&m, &["not the pod IP"]);
}

#[test]
fn negative_missing_probes_resources_and_literal_secrets_fail() {
    let mut m = fragment("aspire-worker", &GOOD_WORKER_ARGS, worker_env());
    let container = &mut m.objects[1]["spec"]["template"]["spec"]["containers"][0];
    container["readinessProbe"] = Value::Null;
    container["livenessProbe"] = json!({"grpc": {"port": 8500}});
    container["resources"]["limits"] = json!({"cpu": "1"});
    container["env"]
        .as_array_mut()
        .expect("a list")
        .push(json!({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}));
    m.objects.push(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "aspire-storage-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": "AKIA"},
    }));
    assert_problem(&m, &["readinessProbe must be a grpc probe on port 8501"]);
    assert_problem(&m, &["livenessProbe", "port 8501"]);
    assert_problem(&m, &["no resources.limits.memory"]);
    assert_problem(&m, &["env AWS_SECRET_ACCESS_KEY is a literal"]);
    assert_problem(
        &m,
        &["Secret/aspire-storage-credentials: a Secret with values"],
    );
}

#[test]
fn negative_an_etcd_that_is_not_deployed_fails() {
    let mut m = fragment("aspire-worker", &GOOD_WORKER_ARGS, worker_env());
    m.objects[0]["data"]["ASPIRE_ETCD_ENDPOINTS"] = json!("http://aspire-etcd-0.aspire-etcd:2379");
    assert_problem(
        &m,
        &["etcd endpoint http://aspire-etcd-0.aspire-etcd:2379 is not outside"],
    );
}

#[test]
fn negative_an_undeclared_metrics_port_fails() {
    let mut args = GOOD_WORKER_ARGS.to_vec();
    args.push("--metrics-port=9600");
    let m = fragment("aspire-worker", &args, worker_env());
    assert_problem(
        &m,
        &["serves metrics on 9600 but declares no containerPort 9600"],
    );
}

#[test]
fn negative_a_short_grace_period_fails() {
    let mut m = fragment("aspire-worker", &GOOD_WORKER_ARGS, worker_env());
    m.objects[1]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(5);
    assert_problem(
        &m,
        &["terminationGracePeriodSeconds 5s is shorter than the drain"],
    );
}

#[test]
fn negative_tls_without_a_secret_volume_or_with_grpc_probes_fails() {
    let mut args = GOOD_WORKER_ARGS.to_vec();
    args.push("--ssl-config-file=/etc/aspire/tls/ssl.cfg");
    let m = fragment("aspire-worker", &args, worker_env());
    assert_problem(
        &m,
        &["--ssl-config-file /etc/aspire/tls/ssl.cfg is not on a Secret volume"],
    );
    assert_problem(
        &m,
        &["readinessProbe must be a tcpSocket probe on port 8501"],
    );

    let m = fragment(
        "aspire-router",
        &["--port=8501", "--worker-tls-ca-file=/etc/aspire/tls/ca.crt"],
        json!([]),
    );
    assert_problem(
        &m,
        &["--worker-tls-ca-file is set but no worker serves TLS"],
    );
    assert_problem(&m, &["set --worker-tls-server-name"]);
}
