//! The command line of `aspire-bench`: one subcommand per tool, each parsed into the
//! library's config and run by [`run`].

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

use crate::compute::{ComputeConfig, run_compute};
use crate::error::{Error, Result};
use crate::load::{LoadConfig, Watched, run_load};
use crate::report::{Record, Results, render};
use crate::request::{OutputEncoding, RequestSpec, parse_shape, response_like};
use crate::soak::stats::GrowthBound;
use crate::soak::{SoakConfig, run_soak};
use crate::transport::{BareService, serve};

/// `aspire-bench`: load generator, ceilings and report of `make bench`.
#[derive(Debug, Parser)]
#[command(
    name = "aspire-bench",
    about = "Benchmark Aspire: closed-loop gRPC load, the transport and compute ceilings, and the report"
)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Drive a PredictionService with N closed-loop callers; print one JSON line.
    Load(LoadArgs),
    /// Serve a bare PredictionService that answers without running anything.
    TransportCeiling(TransportArgs),
    /// Time a TorchScript model's forward pass in-process; print one JSON line per batch size.
    ComputeCeiling(ComputeArgs),
    /// Print the batch sizes the compute ceiling should time: a base set plus the sizes
    /// the batcher formed in a results file.
    BatchSizes(BatchSizesArgs),
    /// Render a results file as the markdown table and target checks.
    Report(ReportArgs),
    /// Soak the whole stack (`make soak`): steady load through the router for minutes
    /// while versions arrive, a pin comes and goes, etcd restarts and freezes and a worker
    /// is killed; fails on any failed call or on memory growth past the bound.
    Soak(SoakArgs),
}

/// A tensor shape flag, e.g. `1,784` (one value, so clap does not take it for a list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dims(pub Vec<i64>);

/// A list of batch sizes flag, e.g. `1,8,32`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sizes(pub Vec<usize>);

fn shape(text: &str) -> Result<Dims, String> {
    parse_shape(text).map(Dims)
}

fn sizes(text: &str) -> Result<Sizes, String> {
    text.split(',')
        .map(|s| match s.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!(
                "{s:?} is not a positive integer; write e.g. 1,8,32"
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Sizes)
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

fn watched(text: &str) -> Result<Watched, String> {
    let (name, pid) = key_value(text)?;
    let pid = pid
        .parse()
        .map_err(|_| format!("{text:?}: the process id after '=' is not a number"))?;
    Ok(Watched { name, pid })
}

fn seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{text:?} is not a number of seconds"))
}

/// `aspire-bench load`.
#[derive(Debug, Args)]
pub struct LoadArgs {
    /// The server: `host:port` or an `http://` URI.
    #[arg(long)]
    pub server: String,
    /// `ModelSpec.name`.
    #[arg(long)]
    pub model: String,
    /// `ModelSpec.signature_name`.
    #[arg(long, default_value = "serving_default")]
    pub signature: String,
    /// `ModelSpec.version`; without it the server picks.
    #[arg(long)]
    pub model_version: Option<i64>,
    /// The input's name.
    #[arg(long)]
    pub input_name: String,
    /// The input's shape, batch dimension first (float32, random values).
    #[arg(long, value_parser = shape)]
    pub shape: Dims,
    /// Callers, each with one call in flight.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Callers sharing one HTTP/2 connection.
    #[arg(long, default_value_t = 16)]
    pub tasks_per_connection: usize,
    /// The measured window, seconds.
    #[arg(long, value_parser = seconds, default_value = "5")]
    pub duration_secs: Duration,
    /// Load before the window, not measured, seconds.
    #[arg(long, value_parser = seconds, default_value = "1")]
    pub warmup_secs: Duration,
    /// The gRPC deadline of each call, seconds.
    #[arg(long, value_parser = seconds, default_value = "60")]
    pub timeout_secs: Duration,
    /// Threads of this generator's async runtime.
    #[arg(long, default_value_t = 1)]
    pub runtime_threads: usize,
    /// A process whose CPU time over the window is reported, NAME=PID (repeatable).
    #[arg(long, value_parser = watched)]
    pub watch: Vec<Watched>,
    /// The worker's Prometheus endpoint, scraped when the window opens and closes.
    #[arg(long)]
    pub worker_metrics_url: Option<String>,
    /// A label copied into the report, KEY=VALUE (repeatable).
    #[arg(long, value_parser = key_value)]
    pub tag: Vec<(String, String)>,
    /// Also append the JSON line to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `aspire-bench transport-ceiling`.
#[derive(Debug, Args)]
pub struct TransportArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any; the port is printed).
    #[arg(long)]
    pub port: u16,
    /// The model named in the answer.
    #[arg(long, default_value = "model")]
    pub model: String,
    /// The signature named in the answer.
    #[arg(long, default_value = "serving_default")]
    pub signature: String,
    /// The answer's one output.
    #[arg(long, default_value = "output")]
    pub output_name: String,
    /// The answer's output shape (float32).
    #[arg(long, value_parser = shape)]
    pub output_shape: Dims,
    /// How the output is encoded (the worker's default is typed).
    #[arg(long, value_enum, default_value_t = OutputEncoding::Typed)]
    pub output_encoding: OutputEncoding,
    /// Threads of the server's async runtime [default: the CPUs this process may use,
    /// as the worker's].
    #[arg(long)]
    pub runtime_threads: Option<usize>,
    /// Stop after this many seconds at most (also on SIGTERM or Ctrl-C).
    #[arg(long, value_parser = seconds, default_value = "3600")]
    pub max_secs: Duration,
}

/// `aspire-bench compute-ceiling`.
#[derive(Debug, Args)]
pub struct ComputeArgs {
    /// The version directory holding `model.pt`.
    #[arg(long)]
    pub model_dir: PathBuf,
    /// One request's input shape, batch dimension first; each batch size replaces it.
    #[arg(long, value_parser = shape)]
    pub shape: Dims,
    /// Batch sizes to time.
    #[arg(long, value_parser = sizes, default_value = "1,2,4,8,16,32")]
    pub batch_sizes: Sizes,
    /// Timed window per batch size, seconds (at least --min-calls calls).
    #[arg(long, value_parser = seconds, default_value = "5")]
    pub duration_secs: Duration,
    /// Warm-up per batch size, seconds (at least --min-calls calls).
    #[arg(long, value_parser = seconds, default_value = "1")]
    pub warmup_secs: Duration,
    /// Fewest calls in each warm-up and timed window.
    #[arg(long, default_value_t = 3)]
    pub min_calls: u32,
    /// LibTorch intra-op threads [default: the CPUs this process may use, as the worker's].
    #[arg(long)]
    pub intra_op_threads: Option<usize>,
    /// A label copied into each line, KEY=VALUE (repeatable).
    #[arg(long, value_parser = key_value)]
    pub tag: Vec<(String, String)>,
    /// Also append the JSON lines to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `aspire-bench batch-sizes`.
#[derive(Debug, Args)]
pub struct BatchSizesArgs {
    /// The results file (JSON lines).
    #[arg(long)]
    pub results: PathBuf,
    /// The model.
    #[arg(long)]
    pub model: String,
    /// Sizes always timed.
    #[arg(long, value_parser = sizes, default_value = "1,2,4,8,16,32")]
    pub base: Sizes,
}

/// `aspire-bench report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The results file (JSON lines).
    #[arg(long)]
    pub results: PathBuf,
    /// A fact printed above the table, NAME=VALUE (repeatable, in order).
    #[arg(long, value_parser = key_value)]
    pub meta: Vec<(String, String)>,
    /// Markdown file whose generated section (between the markers) is replaced; the
    /// section is appended if the file has none.
    #[arg(long)]
    pub write: Option<PathBuf>,
}

/// `aspire-bench soak`. Every flag also reads a `SOAK_*` environment variable, as
/// `make soak` passes them.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Minutes of load (the exports and the stack's start come before).
    #[arg(long, env = "SOAK_MINUTES", default_value_t = 10.0)]
    pub minutes: f64,
    /// A line is printed (and memory read) this often, seconds.
    #[arg(long, env = "SOAK_REPORT_EVERY_SECONDS", value_parser = seconds, default_value = "60")]
    pub report_every_secs: Duration,
    /// A new model version arrives this often, seconds.
    #[arg(long, env = "SOAK_VERSION_EVERY_SECONDS", value_parser = seconds, default_value = "30")]
    pub version_every_secs: Duration,
    /// How long the killed worker stays down before it is started again, seconds.
    #[arg(long, env = "SOAK_WORKER_DOWN_SECONDS", value_parser = seconds, default_value = "5")]
    pub worker_down_secs: Duration,
    /// How long etcd stays frozen (SIGSTOP), seconds; must exceed --lease-ttl
    /// [default: --lease-ttl + 5].
    #[arg(long, env = "SOAK_FREEZE_SECONDS", value_parser = seconds)]
    pub freeze_secs: Option<Duration>,
    /// `--lease-ttl` of every role, seconds.
    #[arg(long, env = "SOAK_LEASE_TTL", default_value_t = 10)]
    pub lease_ttl: u64,
    /// Closed-loop callers through the router.
    #[arg(long, env = "SOAK_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
    /// The deadline of each call, seconds.
    #[arg(long, env = "SOAK_TIMEOUT_SECONDS", value_parser = seconds, default_value = "10")]
    pub timeout_secs: Duration,
    /// Directory holding aspire-worker, aspire-router, aspire-discovery, aspirectl and
    /// mnist-export [default: this binary's directory].
    #[arg(long, env = "SOAK_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Where the exports (kept between runs), the watched directory and the logs go.
    #[arg(long, env = "SOAK_DIR", default_value = ".aspire/soak")]
    pub dir: PathBuf,
    /// The MNIST CSV for mnist-export [default: mnist-export's, data/mnist_5k.csv.gz].
    #[arg(long, env = "SOAK_MNIST_DATA")]
    pub mnist_data: Option<PathBuf>,
    /// The memory bound: a process fails the soak when its RSS at the end exceeds this
    /// factor times its RSS a full minute after it started, plus --rss-slack-mib.
    #[arg(long, env = "SOAK_RSS_FACTOR", default_value_t = 1.5)]
    pub rss_factor: f64,
    /// The memory bound's allowance on top of the factor, MiB.
    #[arg(long, env = "SOAK_RSS_SLACK_MIB", default_value_t = 64)]
    pub rss_slack_mib: u64,
    /// How long the stack may take to answer its first call, seconds.
    #[arg(long, env = "SOAK_READY_WITHIN_SECONDS", value_parser = seconds, default_value = "180")]
    pub ready_within_secs: Duration,
    /// Threads of the load generator's async runtime.
    #[arg(long, env = "SOAK_CLIENT_THREADS", default_value_t = 2)]
    pub runtime_threads: usize,
}

/// The line that opens the generated section of BENCHMARKS.md.
pub const BEGIN_MARKER: &str =
    "<!-- aspire-bench:begin (generated by `make bench`; edits here are overwritten) -->";
/// The line that closes it.
pub const END_MARKER: &str = "<!-- aspire-bench:end -->";

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Runs the subcommand.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Load(args) => run_load_command(args),
        Command::TransportCeiling(args) => run_transport(args),
        Command::ComputeCeiling(args) => run_compute_command(args),
        Command::BatchSizes(args) => {
            let results = read_results(&args.results)?;
            let sizes = results.batch_sizes_to_measure(&args.model, &args.base.0);
            let text: Vec<String> = sizes.iter().map(ToString::to_string).collect();
            println!("{}", text.join(","));
            Ok(())
        }
        Command::Report(args) => run_report(args),
        Command::Soak(args) => run_soak_command(args),
    }
}

fn run_load_command(args: LoadArgs) -> Result<()> {
    let config = LoadConfig {
        server: args.server,
        request: RequestSpec {
            model: args.model,
            signature: args.signature,
            version: args.model_version,
            input_name: args.input_name,
            shape: args.shape.0,
        },
        concurrency: args.concurrency,
        tasks_per_connection: args.tasks_per_connection,
        warmup: args.warmup_secs,
        duration: args.duration_secs,
        timeout: args.timeout_secs,
        watch: args.watch,
        worker_metrics_url: args.worker_metrics_url,
        tags: args.tag.into_iter().collect(),
    };
    let report = runtime(args.runtime_threads)?.block_on(run_load(&config))?;
    let errors: u64 = report.errors.values().sum();
    eprintln!(
        "{} c={}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {} errors, client CPU {:.1} µs/req",
        config.tags.values().cloned().collect::<Vec<_>>().join("/"),
        report.concurrency,
        report.throughput_rps,
        report.latency.p50_us / 1e3,
        report.latency.p99_us / 1e3,
        errors,
        report.generator_cpu.us_per_request
    );
    let line = serde_json::to_string(&Record::Load(Box::new(report)))
        .map_err(|e| Error::BadResult(e.to_string()))?;
    println!("{line}");
    if let Some(out) = &args.out {
        append_line(out, &line)?;
    }
    Ok(())
}

fn run_soak_command(args: SoakArgs) -> Result<()> {
    if !(args.minutes.is_finite() && args.minutes > 0.0 && args.minutes <= 7.0 * 24.0 * 60.0) {
        return Err(Error::InvalidOption(format!(
            "--minutes (SOAK_MINUTES) is {}; give a number of minutes above 0, e.g. 10",
            args.minutes
        )));
    }
    if !(args.rss_factor.is_finite() && args.rss_factor >= 1.0) {
        return Err(Error::InvalidOption(format!(
            "--rss-factor (SOAK_RSS_FACTOR) is {}; give a factor of at least 1, e.g. 1.5",
            args.rss_factor
        )));
    }
    if args.report_every_secs < Duration::from_secs(1) {
        return Err(Error::InvalidOption(
            "--report-every-secs (SOAK_REPORT_EVERY_SECONDS) must be at least 1".to_string(),
        ));
    }
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()
            .map_err(|e| Error::io("finding this binary's directory (give --bin-dir)", e))?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| {
                Error::InvalidOption("this binary has no directory; give --bin-dir".to_string())
            })?,
    };
    let config = SoakConfig {
        total: Duration::from_secs_f64(args.minutes * 60.0),
        period: args.report_every_secs,
        version_every: args.version_every_secs,
        worker_down: args.worker_down_secs,
        freeze: args
            .freeze_secs
            .unwrap_or(Duration::from_secs(args.lease_ttl.saturating_add(5))),
        lease_ttl_secs: args.lease_ttl,
        concurrency: args.concurrency,
        timeout: args.timeout_secs,
        bin_dir,
        dir: args.dir,
        mnist_data: args.mnist_data,
        bound: GrowthBound {
            factor: args.rss_factor,
            slack_bytes: args.rss_slack_mib.saturating_mul(1 << 20),
        },
        ready_within: args.ready_within_secs,
    };
    let rt = runtime(args.runtime_threads)?;
    let outcome = run_soak(&config, &rt)?;
    let problems = outcome.problems();
    if problems.is_empty() {
        println!("soak: PASS");
        Ok(())
    } else {
        println!("soak: FAIL");
        for p in &problems {
            println!("  - {p}");
        }
        Err(Error::SoakFailed(problems.join("; ")))
    }
}

fn run_transport(args: TransportArgs) -> Result<()> {
    let response = response_like(
        &args.model,
        &args.signature,
        &args.output_name,
        &args.output_shape.0,
        args.output_encoding,
    );
    let rt = runtime(args.runtime_threads.unwrap_or_else(cpus))?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|e| Error::io(format!("listening on {addr} (--host, --port)"), e))?;
        let local = listener
            .local_addr()
            .map_err(|e| Error::io("reading the listen address", e))?;
        eprintln!("aspire-bench transport-ceiling: listening on {local}");
        let max = args.max_secs;
        serve(BareService::new(response), listener, async move {
            tokio::select! {
                () = shutdown_signal() => {}
                () = tokio::time::sleep(max) => {}
            }
        })
        .await?;
        Ok(())
    })
}

/// Resolves on SIGTERM or Ctrl-C.
pub(crate) async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn run_compute_command(args: ComputeArgs) -> Result<()> {
    let config = ComputeConfig {
        model_dir: args.model_dir,
        shape: args.shape.0,
        batch_sizes: args.batch_sizes.0,
        warmup: args.warmup_secs,
        duration: args.duration_secs,
        min_calls: args.min_calls.max(1),
        intra_op_threads: args.intra_op_threads,
        tags: args.tag.into_iter().collect::<BTreeMap<_, _>>(),
    };
    for point in run_compute(&config)? {
        eprintln!(
            "compute batch {}: {:.1} rows/s, forward pass p50 {:.3} ms ({} calls)",
            point.batch,
            point.rows_per_s,
            point.p50_us / 1e3,
            point.calls
        );
        let line = serde_json::to_string(&Record::Compute(point))
            .map_err(|e| Error::BadResult(e.to_string()))?;
        println!("{line}");
        if let Some(out) = &args.out {
            append_line(out, &line)?;
        }
    }
    Ok(())
}

fn read_results(path: &Path) -> Result<Results> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    Results::parse(&text)
}

fn run_report(args: ReportArgs) -> Result<()> {
    let results = read_results(&args.results)?;
    let section = render(&results, &args.meta);
    print!("{section}");
    if let Some(path) = &args.write {
        let old = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let new = replace_section(&old, &section);
        std::fs::write(path, new)
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    Ok(())
}

/// `text` with what lies between [`BEGIN_MARKER`] and [`END_MARKER`] replaced by
/// `section`; with the markers and section appended when `text` has no such pair.
pub fn replace_section(text: &str, section: &str) -> String {
    let block = format!("{BEGIN_MARKER}\n{}\n{END_MARKER}", section.trim_end());
    if let (Some(begin), Some(end)) = (text.find(BEGIN_MARKER), text.find(END_MARKER))
        && begin < end
    {
        return format!(
            "{}{block}{}",
            &text[..begin],
            &text[end + END_MARKER.len()..]
        );
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push_str(if out.ends_with('\n') { "\n" } else { "\n\n" });
    }
    out.push_str(&block);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_section_is_replaced_in_place() {
        let old =
            format!("# B\n\nintro\n\n{BEGIN_MARKER}\nold table\n{END_MARKER}\n\n## Notes\nkept\n");
        let new = replace_section(&old, "new table\n");
        assert_eq!(
            new,
            format!("# B\n\nintro\n\n{BEGIN_MARKER}\nnew table\n{END_MARKER}\n\n## Notes\nkept\n")
        );
        assert_eq!(
            replace_section("", "t"),
            format!("{BEGIN_MARKER}\nt\n{END_MARKER}\n")
        );
        assert_eq!(
            replace_section("# B\n", "t"),
            format!("# B\n\n{BEGIN_MARKER}\nt\n{END_MARKER}\n")
        );
    }

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "aspire-bench",
            "load",
            "--server",
            "127.0.0.1:1",
            "--model",
            "mnist",
            "--input-name",
            "images",
            "--shape",
            "1,784",
            "--watch",
            "router=42",
            "--tag",
            "path=direct",
            "--duration-secs",
            "0.5",
        ])
        .unwrap();
        let Command::Load(args) = cli.command else {
            panic!("not load");
        };
        assert_eq!(args.shape, Dims(vec![1, 784]));
        assert_eq!(
            args.watch,
            vec![Watched {
                name: "router".into(),
                pid: 42
            }]
        );
        assert_eq!(args.duration_secs, Duration::from_millis(500));
        assert_eq!(args.tag, vec![("path".to_string(), "direct".to_string())]);
        assert!(Cli::try_parse_from(["aspire-bench", "load", "--watch", "x"]).is_err());
        assert_eq!(sizes("1, 8,32").unwrap(), Sizes(vec![1, 8, 32]));
        assert!(sizes("1,0").is_err());
    }
}
