//! The router's TLS to workers: its flags (`--worker-tls-*`), checked at start, and the
//! tonic client TLS config they describe. With a CA given, worker channels use TLS and a
//! worker must present a certificate signed by it for its advertised address (an IP
//! address SAN when the address is an IP) or for `--worker-tls-server-name`. With a
//! certificate and key given too, the router presents them (mTLS, for workers whose SSL
//! config has `client_verify: true`).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::error::TlsError;
use crate::pem;

/// The router's flags for TLS to workers.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct WorkerTlsArgs {
    /// PEM file of the CA that signs the workers' certificates; given, the router talks
    /// to workers over TLS only [default: plaintext].
    #[arg(
        long = "worker-tls-ca-file",
        visible_alias = "worker_tls_ca_file",
        env = "ASPIRE_WORKER_TLS_CA_FILE"
    )]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate the router presents to workers (mTLS); needs
    /// --worker-tls-key-file and --worker-tls-ca-file.
    #[arg(
        long = "worker-tls-cert-file",
        visible_alias = "worker_tls_cert_file",
        env = "ASPIRE_WORKER_TLS_CERT_FILE"
    )]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --worker-tls-cert-file.
    #[arg(
        long = "worker-tls-key-file",
        visible_alias = "worker_tls_key_file",
        env = "ASPIRE_WORKER_TLS_KEY_FILE"
    )]
    pub key_file: Option<PathBuf>,
    /// Name every worker's certificate must carry [default: each worker's advertised
    /// host, an IP address SAN when it is an IP].
    #[arg(
        long = "worker-tls-server-name",
        visible_alias = "worker_tls_server_name",
        env = "ASPIRE_WORKER_TLS_SERVER_NAME"
    )]
    pub server_name: Option<String>,
}

impl WorkerTlsArgs {
    /// The client TLS config for worker channels, `None` for plaintext; reads and checks
    /// the files, and the error names the flag at fault.
    pub fn client_config(&self) -> Result<Option<ClientTlsConfig>, TlsError> {
        let flag_error =
            |flag: &'static str| move |message: String| TlsError::Flag { flag, message };
        let Some(ca_file) = &self.ca_file else {
            let given = [
                (self.cert_file.is_some(), "--worker-tls-cert-file"),
                (self.key_file.is_some(), "--worker-tls-key-file"),
                (self.server_name.is_some(), "--worker-tls-server-name"),
            ];
            if let Some((_, flag)) = given.iter().find(|(set, _)| *set) {
                return Err(flag_error(flag)(
                    "needs --worker-tls-ca-file, the CA that signs the workers' certificates"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let ca = read("--worker-tls-ca-file", ca_file)?;
        pem::root_store(&ca).map_err(|m| {
            flag_error("--worker-tls-ca-file")(format!("{}: {m}", ca_file.display()))
        })?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        match (&self.cert_file, &self.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let cert = read("--worker-tls-cert-file", cert_file)?;
                let key = read("--worker-tls-key-file", key_file)?;
                let chain = pem::certificates(&cert).map_err(|m| {
                    flag_error("--worker-tls-cert-file")(format!("{}: {m}", cert_file.display()))
                })?;
                let parsed = pem::private_key(&key).map_err(|m| {
                    flag_error("--worker-tls-key-file")(format!("{}: {m}", key_file.display()))
                })?;
                pem::check_pair(&chain, &parsed, &pem::provider()).map_err(|m| {
                    flag_error("--worker-tls-key-file / --worker-tls-cert-file")(format!(
                        "{} / {}: {m}",
                        key_file.display(),
                        cert_file.display()
                    ))
                })?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            (Some(_), None) => {
                return Err(flag_error("--worker-tls-cert-file")(
                    "needs --worker-tls-key-file, its private key".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(flag_error("--worker-tls-key-file")(
                    "needs --worker-tls-cert-file, the certificate it belongs to".into(),
                ));
            }
            (None, None) => {}
        }
        if let Some(name) = &self.server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                return Err(flag_error("--worker-tls-server-name")(format!(
                    "{name:?} is neither a DNS name nor an IP address"
                )));
            }
            config = config.domain_name(name.clone());
        }
        Ok(Some(config))
    }
}

/// The URI a worker channel connects to: `https://` when TLS is on, `http://` otherwise;
/// an address that already has a scheme is taken as it is.
pub fn worker_uri(address: &str, tls: bool) -> String {
    if address.contains("://") {
        address.to_string()
    } else if tls {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    }
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestCa;

    #[test]
    fn flags_are_checked_and_named() {
        let ca = TestCa::new("ca");
        let (a, b) = (ca.issue(&["router"]), ca.issue(&["other"]));
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            Some(path)
        };
        let ok = WorkerTlsArgs {
            ca_file: file("ca.pem", &ca.cert_pem()),
            cert_file: file("a.pem", &a.cert),
            key_file: file("a.key", &a.key),
            server_name: Some("aspire-worker".into()),
        };
        assert!(ok.client_config().unwrap().is_some());
        assert!(WorkerTlsArgs::default().client_config().unwrap().is_none());

        let cases = [
            (
                WorkerTlsArgs {
                    ca_file: None,
                    ..ok.clone()
                },
                "--worker-tls-cert-file: needs --worker-tls-ca-file",
            ),
            (
                WorkerTlsArgs {
                    key_file: None,
                    ..ok.clone()
                },
                "--worker-tls-cert-file: needs --worker-tls-key-file",
            ),
            (
                WorkerTlsArgs {
                    cert_file: None,
                    ..ok.clone()
                },
                "--worker-tls-key-file: needs --worker-tls-cert-file",
            ),
            (
                WorkerTlsArgs {
                    key_file: file("b.key", &b.key),
                    ..ok.clone()
                },
                "does not match",
            ),
            (
                WorkerTlsArgs {
                    ca_file: file("bad.pem", "nothing"),
                    ..ok.clone()
                },
                "--worker-tls-ca-file: ",
            ),
            (
                WorkerTlsArgs {
                    cert_file: dir.path().join("missing").into(),
                    ..ok.clone()
                },
                "--worker-tls-cert-file ",
            ),
            (
                WorkerTlsArgs {
                    server_name: Some("not a name!".into()),
                    ..ok.clone()
                },
                "--worker-tls-server-name",
            ),
        ];
        for (args, expected) in cases {
            let err = args.client_config().unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        }
    }

    #[test]
    fn worker_uris_follow_tls() {
        assert_eq!(worker_uri("10.0.0.1:8501", true), "https://10.0.0.1:8501");
        assert_eq!(worker_uri("10.0.0.1:8501", false), "http://10.0.0.1:8501");
        assert_eq!(worker_uri("http://w:1", true), "http://w:1");
    }
}
