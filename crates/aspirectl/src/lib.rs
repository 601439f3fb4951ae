//! `aspirectl`: shows what an Aspire cluster serves and pins or unpins versions. It reads
//! and writes exactly the registry keys that `etcdctl` would (see `aspire_core::keys`),
//! through the same [`Registry`] trait the services use, so the two are interchangeable.

use std::fmt::Write as _;

use aspire_core::model::list_versions;
use aspire_core::records::{DesiredSource, parse_pin};
use aspire_core::{ClusterState, ModelName};
use aspire_registry::Registry;
use clap::{Parser, Subcommand};

/// `aspirectl`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "aspirectl",
    version,
    about = "Show and steer an Aspire cluster through etcd"
)]
pub struct Cli {
    /// etcd.
    #[command(flatten)]
    pub etcd: aspire_registry::cli::EtcdArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Models (available, aspired, pinned and desired versions), workers (each version's
    /// state and load error) and keys that mean nothing.
    Status,
    /// Serve exactly these versions of MODEL (e.g. `1` or `1,2`) instead of the aspired
    /// ones; refused unless every version is available.
    Pin {
        /// The model.
        model: String,
        /// One version or a comma-separated list.
        versions: String,
    },
    /// Drop MODEL's pin: its version policy decides again.
    Unpin {
        /// The model.
        model: String,
    },
}

/// Runs one command; the `Ok` text is what to print.
pub async fn run(command: &Command, registry: &dyn Registry) -> anyhow::Result<String> {
    match command {
        Command::Status => Ok(render_status(&registry.state().await?)),
        Command::Pin { model, versions } => {
            let name = ModelName::new(model.as_str())?;
            let state = registry.state().await?;
            let available = state.models.get(&name).and_then(|m| m.available.as_ref());
            let pinned = parse_pin(versions, available)
                .map_err(|e| anyhow::anyhow!("refusing to pin model {name}: {e}"))?;
            let text = pinned
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",");
            registry.set_pinned(&name, Some(&text)).await?;
            Ok(format!(
                "pinned model {name} to version(s) {}; `aspirectl unpin {name}` resumes its version policy",
                list_versions(pinned)
            ))
        }
        Command::Unpin { model } => {
            let name = ModelName::new(model.as_str())?;
            registry.set_pinned(&name, None).await?;
            Ok(format!(
                "unpinned model {name}: its aspired versions apply again"
            ))
        }
    }
}

/// The human-readable status of a cluster.
pub fn render_status(state: &ClusterState) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "MODELS");
    if state.models.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (name, model) in &state.models {
        let available = model
            .available
            .as_ref()
            .map(|a| a.numbers())
            .unwrap_or_default();
        let aspired = model
            .aspired
            .as_ref()
            .map(|a| a.versions.clone())
            .unwrap_or_default();
        let desired = model.desired();
        let _ = writeln!(out, "  {name}");
        let _ = writeln!(out, "    available: {}", list_versions(available));
        let _ = writeln!(out, "    aspired:   {}", list_versions(aspired));
        match (&model.pinned, &desired.pin_problem) {
            (None, _) => {
                let _ = writeln!(out, "    pinned:    -");
            }
            (Some(raw), None) => {
                let _ = writeln!(out, "    pinned:    {raw}");
            }
            (Some(raw), Some(why)) => {
                let _ = writeln!(out, "    pinned:    {raw:?} IGNORED: {why}");
            }
        }
        let source = match desired.source {
            DesiredSource::Pinned => "pinned",
            DesiredSource::Aspired => "aspired",
        };
        let _ = writeln!(
            out,
            "    serving:   {} (from {source})",
            list_versions(desired.versions)
        );
    }
    let _ = writeln!(out, "WORKERS");
    if state.workers.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (id, worker) in &state.workers {
        let _ = writeln!(out, "  {id}  {}  {}", worker.address, worker.device);
        for (model, versions) in &worker.models {
            for (version, status) in versions {
                let error = status
                    .error
                    .as_deref()
                    .map(|e| format!("  error: {e}"))
                    .unwrap_or_default();
                let _ = writeln!(out, "    {model} v{version}: {}{error}", status.state);
            }
        }
        for slow in &worker.slow_passes {
            let _ = writeln!(
                out,
                "    {} v{}: SLOW PASSES {} running now, {} since loaded (past the worker's --slow-pass-seconds)",
                slow.model, slow.version, slow.running, slow.total
            );
        }
    }
    if !state.problems.is_empty() {
        let _ = writeln!(out, "IGNORED KEYS");
        for (key, why) in &state.problems {
            let _ = writeln!(out, "  {key}: {why}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use aspire_core::records::{VersionState, VersionStatus};
    use aspire_core::{
        AspiredVersions, AvailableVersion, AvailableVersions, SignatureMap, SlowPasses, Version,
        WorkerRecord,
    };
    use aspire_registry::MemoryRegistry;

    fn v(n: u64) -> Version {
        Version::new(n).unwrap()
    }

    async fn registry() -> MemoryRegistry {
        let r = MemoryRegistry::default();
        let m = ModelName::new("mnist").unwrap();
        let available = AvailableVersions {
            versions: [1, 2]
                .map(|n| AvailableVersion {
                    version: v(n),
                    path: format!("file:///m/{n}"),
                    signatures: SignatureMap::default_for_untyped_model(),
                })
                .to_vec(),
        };
        r.put_available(&m, &available).await.unwrap();
        r.put_aspired(
            &m,
            &AspiredVersions {
                versions: vec![v(2)],
            },
        )
        .await
        .unwrap();
        let mut rec = WorkerRecord {
            address: "127.0.0.1:8501".into(),
            device: "cpu".into(),
            ..Default::default()
        };
        rec.models.insert(
            m,
            [
                (
                    v(2),
                    VersionStatus {
                        state: VersionState::Available,
                        error: None,
                    },
                ),
                (
                    v(3),
                    VersionStatus {
                        state: VersionState::End,
                        error: Some("model.pt: bad zip".into()),
                    },
                ),
            ]
            .into(),
        );
        rec.slow_passes.push(SlowPasses {
            model: ModelName::new("mnist").unwrap(),
            version: v(2),
            running: 1,
            total: 4,
        });
        r.put_worker("w1", &rec).await.unwrap();
        r
    }

    #[tokio::test]
    async fn pin_checks_availability_and_writes_the_key() {
        let r = registry().await;
        let err = run(
            &Command::Pin {
                model: "mnist".into(),
                versions: "3".into(),
            },
            &r,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("available: 1, 2"), "{err}");
        assert!(
            run(
                &Command::Pin {
                    model: "mnist".into(),
                    versions: "x".into()
                },
                &r
            )
            .await
            .is_err()
        );
        assert_eq!(
            r.state()
                .await
                .unwrap()
                .models
                .values()
                .next()
                .unwrap()
                .pinned,
            None
        );

        run(
            &Command::Pin {
                model: "mnist".into(),
                versions: "2, 1".into(),
            },
            &r,
        )
        .await
        .unwrap();
        let state = r.state().await.unwrap();
        let model = &state.models[&ModelName::new("mnist").unwrap()];
        assert_eq!(model.pinned.as_deref(), Some("1,2"));
        run(
            &Command::Unpin {
                model: "mnist".into(),
            },
            &r,
        )
        .await
        .unwrap();
        assert_eq!(
            r.state().await.unwrap().models[&ModelName::new("mnist").unwrap()].pinned,
            None
        );
    }

    #[tokio::test]
    async fn status_shows_versions_workers_errors_and_bad_keys() {
        let r = registry().await;
        r.put_raw("/aspire/models/mnist/pinned", Some(b"7"))
            .await
            .unwrap();
        r.put_raw("/aspire/models/mnist/pined", Some(b"1"))
            .await
            .unwrap();
        let text = run(&Command::Status, &r).await.unwrap();
        for needle in [
            "available: 1, 2",
            "aspired:   2",
            "pinned:    \"7\" IGNORED",
            "serving:   2 (from aspired)",
            "w1  127.0.0.1:8501  cpu",
            "mnist v2: AVAILABLE",
            "mnist v3: END  error: model.pt: bad zip",
            "/aspire/models/mnist/pined",
            "mnist v2: SLOW PASSES 1 running now, 4 since loaded",
        ] {
            assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
        }
    }
}
