//! The etcd flags every clustered binary takes (`aspire-discovery`, `aspire-worker`,
//! `aspire-router`, `aspirectl`), so they are spelt and defaulted alike: where etcd is,
//! the prefix, and how to reach it safely (TLS files, user and password).

use std::path::{Path, PathBuf};
use std::time::Duration;

use aspire_core::keys::{DEFAULT_PREFIX, KeySchema};
use clap::Args;

use crate::etcd::{EtcdAuth, EtcdSecurity, EtcdTls};
use crate::{EtcdOptions, EtcdRegistry, RegistryError};

/// Environment variable holding the etcd password, the one way besides
/// `--etcd-password-file` to give it. There is no flag: a flag's value shows in `ps`.
pub const PASSWORD_ENV: &str = "ASPIRE_ETCD_PASSWORD";

/// Where etcd is and which prefix to work under.
#[derive(Debug, Clone, Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated. `https://` endpoints use TLS and need
    /// --etcd-ca-file; endpoints without a scheme are plaintext.
    #[arg(
        long = "etcd-endpoints",
        visible_alias = "etcd_endpoints",
        env = "ASPIRE_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Prefix of every Aspire key in etcd.
    #[arg(long, env = "ASPIRE_PREFIX", default_value = DEFAULT_PREFIX)]
    pub prefix: String,
    /// Seconds a worker's registration outlives the worker (its etcd lease).
    #[arg(
        long = "lease-ttl",
        visible_alias = "lease_ttl",
        env = "ASPIRE_LEASE_TTL",
        default_value_t = 10
    )]
    pub lease_ttl: u64,
    /// TLS and authentication towards etcd.
    #[command(flatten)]
    pub security: EtcdSecurityArgs,
}

/// TLS and authentication towards etcd. All unset (the default) means plaintext without
/// credentials, which only `http://` endpoints accept.
#[derive(Debug, Clone, Default, Args)]
#[command(next_help_heading = "etcd TLS and authentication")]
pub struct EtcdSecurityArgs {
    /// PEM file of the CA that signed etcd's server certificate; required with https://
    /// endpoints. Only this CA is trusted.
    #[arg(
        long = "etcd-ca-file",
        visible_alias = "etcd_ca_file",
        env = "ASPIRE_ETCD_CA_FILE"
    )]
    pub etcd_ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) to present to etcd, for etcd's --client-cert-auth;
    /// needs --etcd-key-file.
    #[arg(
        long = "etcd-cert-file",
        visible_alias = "etcd_cert_file",
        env = "ASPIRE_ETCD_CERT_FILE"
    )]
    pub etcd_cert_file: Option<PathBuf>,
    /// PEM private key of --etcd-cert-file.
    #[arg(
        long = "etcd-key-file",
        visible_alias = "etcd_key_file",
        env = "ASPIRE_ETCD_KEY_FILE"
    )]
    pub etcd_key_file: Option<PathBuf>,
    /// Name expected on etcd's server certificate when it is not the endpoints' host
    /// (e.g. endpoints are IP addresses and the certificate names a DNS name).
    #[arg(
        long = "etcd-tls-server-name",
        visible_alias = "etcd_tls_server_name",
        env = "ASPIRE_ETCD_TLS_SERVER_NAME"
    )]
    pub etcd_tls_server_name: Option<String>,
    /// etcd user to authenticate as (etcd with auth enabled). The password comes from
    /// --etcd-password-file or the ASPIRE_ETCD_PASSWORD environment variable.
    #[arg(
        long = "etcd-user",
        visible_alias = "etcd_user",
        env = "ASPIRE_ETCD_USER"
    )]
    pub etcd_user: Option<String>,
    /// File holding the password of --etcd-user (one trailing newline is ignored).
    #[arg(
        long = "etcd-password-file",
        visible_alias = "etcd_password_file",
        env = "ASPIRE_ETCD_PASSWORD_FILE"
    )]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// Validates the security flags, reads their files and connects; every error is a
    /// sentence naming the flag or the endpoints.
    pub async fn connect(&self) -> Result<EtcdRegistry, RegistryError> {
        let password = std::env::var(PASSWORD_ENV).ok();
        let security = self.security.resolve(&self.etcd_endpoints, password)?;
        let options = EtcdOptions {
            lease_ttl: Duration::from_secs(self.lease_ttl.max(1)),
            ..EtcdOptions::default()
        };
        if security.auth.is_some() && security.tls.is_none() {
            tracing::warn!(
                "--etcd-user over plaintext endpoints: etcd receives the password unencrypted; \
                 use https:// endpoints with --etcd-ca-file"
            );
        }
        EtcdRegistry::connect_with_security(
            &self.etcd_endpoints,
            KeySchema::new(&self.prefix),
            options,
            &security,
        )
        .await
        .map_err(with_flag_hint)
    }
}

impl EtcdSecurityArgs {
    /// Checks the flags against each other and the endpoints, and reads their files.
    /// `env_password` is the value of [`PASSWORD_ENV`] (passed in so tests need not touch
    /// the process environment).
    ///
    /// Refused rather than guessed: `https://` endpoints without `--etcd-ca-file`; TLS
    /// flags with plaintext endpoints; a certificate without its key or a key without its
    /// certificate; a user without a password, a password without a user, or a password
    /// from both the file and the environment; an empty password.
    pub fn resolve(
        &self,
        endpoints: &[String],
        env_password: Option<String>,
    ) -> Result<EtcdSecurity, RegistryError> {
        let https = endpoints.iter().any(|e| crate::etcd::is_https(e));
        let tls = if https {
            Some(self.tls()?)
        } else {
            self.refuse_tls_flags_without_https(endpoints)?;
            None
        };
        let auth = self.auth(env_password)?;
        Ok(EtcdSecurity { tls, auth })
    }

    fn tls(&self) -> Result<EtcdTls, RegistryError> {
        let Some(ca_file) = &self.etcd_ca_file else {
            return Err(config(
                "--etcd-endpoints uses https:// but --etcd-ca-file is not set; give the PEM \
                 file of the CA that signed etcd's server certificate (ASPIRE_ETCD_CA_FILE)"
                    .to_string(),
            ));
        };
        let ca_pem = read_pem(ca_file, "--etcd-ca-file", "CERTIFICATE")?;
        let client_identity = match (&self.etcd_cert_file, &self.etcd_key_file) {
            (Some(cert), Some(key)) => Some((
                read_pem(cert, "--etcd-cert-file", "CERTIFICATE")?,
                read_pem(key, "--etcd-key-file", "PRIVATE KEY")?,
            )),
            (Some(_), None) => {
                return Err(config(
                    "--etcd-cert-file is set but --etcd-key-file is not; give the private key \
                     of the client certificate too"
                        .to_string(),
                ));
            }
            (None, Some(_)) => {
                return Err(config(
                    "--etcd-key-file is set but --etcd-cert-file is not; give the client \
                     certificate the key belongs to"
                        .to_string(),
                ));
            }
            (None, None) => None,
        };
        if self
            .etcd_tls_server_name
            .as_deref()
            .is_some_and(|n| n.trim().is_empty())
        {
            return Err(config(
                "--etcd-tls-server-name is empty; give the DNS name on etcd's certificate, \
                 or leave the flag out"
                    .to_string(),
            ));
        }
        Ok(EtcdTls {
            ca_pem,
            client_identity,
            server_name: self.etcd_tls_server_name.clone(),
        })
    }

    fn refuse_tls_flags_without_https(&self, endpoints: &[String]) -> Result<(), RegistryError> {
        let given = [
            ("--etcd-ca-file", self.etcd_ca_file.is_some()),
            ("--etcd-cert-file", self.etcd_cert_file.is_some()),
            ("--etcd-key-file", self.etcd_key_file.is_some()),
            (
                "--etcd-tls-server-name",
                self.etcd_tls_server_name.is_some(),
            ),
        ];
        match given.iter().find(|(_, set)| *set) {
            Some((flag, _)) => Err(config(format!(
                "{flag} is set but --etcd-endpoints ({}) are not https://; TLS is used only \
                 with https:// endpoints, so change them to https:// (or drop {flag})",
                endpoints.join(",")
            ))),
            None => Ok(()),
        }
    }

    fn auth(&self, env_password: Option<String>) -> Result<Option<EtcdAuth>, RegistryError> {
        let from_file = match &self.etcd_password_file {
            Some(path) => Some(read_password(path)?),
            None => None,
        };
        let password = match (from_file, env_password) {
            (Some(_), Some(_)) => {
                return Err(config(format!(
                    "both --etcd-password-file and {PASSWORD_ENV} are set; give the password \
                     one way only"
                )));
            }
            (Some(p), None) | (None, Some(p)) => Some(p),
            (None, None) => None,
        };
        match (&self.etcd_user, password) {
            (Some(user), _) if user.trim().is_empty() => Err(config(
                "--etcd-user is empty; give the etcd user name, or leave the flag out".to_string(),
            )),
            (Some(_), Some(p)) if p.is_empty() => Err(config(
                "the etcd password is empty (--etcd-password-file or ASPIRE_ETCD_PASSWORD); \
                 give the password of --etcd-user"
                    .to_string(),
            )),
            (Some(user), Some(p)) => Ok(Some(EtcdAuth::new(user.clone(), p))),
            (Some(user), None) => Err(config(format!(
                "--etcd-user {user} is set but no password is; give --etcd-password-file or \
                 set {PASSWORD_ENV}"
            ))),
            (None, Some(_)) => Err(config(format!(
                "an etcd password is given (--etcd-password-file or {PASSWORD_ENV}) but \
                 --etcd-user is not; give the user it belongs to"
            ))),
            (None, None) => Ok(None),
        }
    }
}

fn config(why: String) -> RegistryError {
    RegistryError::Config(why)
}

/// Reads a PEM file and checks it holds a block of the expected kind, so a swapped or
/// empty file is named here rather than failing the TLS handshake obscurely.
fn read_pem(path: &Path, flag: &str, kind: &str) -> Result<Vec<u8>, RegistryError> {
    let bytes = std::fs::read(path).map_err(|e| {
        config(format!(
            "cannot read {flag} {}: {e}; give a readable PEM file",
            path.display()
        ))
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let has_block = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(&format!("{kind}-----")));
    if !has_block {
        return Err(config(format!(
            "{flag} {} holds no PEM \"{kind}\" block; give a PEM file (-----BEGIN ...{kind}-----)",
            path.display()
        )));
    }
    Ok(bytes)
}

/// Reads the password file; one trailing newline (as `echo` writes) is not part of it.
fn read_password(path: &Path) -> Result<String, RegistryError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        config(format!(
            "cannot read --etcd-password-file {}: {e}",
            path.display()
        ))
    })?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    Ok(text.to_string())
}

/// Adds which flags set what etcd refused, to the library's sentence.
fn with_flag_hint(e: RegistryError) -> RegistryError {
    match e {
        RegistryError::Denied(why) if !why.contains("permission denied") => {
            RegistryError::Denied(format!(
                "{why} (the user is --etcd-user, the password --etcd-password-file or \
                 {PASSWORD_ENV}; without a user etcd takes it from --etcd-cert-file's \
                 common name)"
            ))
        }
        RegistryError::Unavailable(why) if why.starts_with("TLS ") => {
            RegistryError::Unavailable(format!(
                "{why} (--etcd-ca-file, --etcd-cert-file, --etcd-key-file, \
                 --etcd-tls-server-name)"
            ))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        etcd: EtcdArgs,
    }

    fn parse(args: &[&str]) -> EtcdArgs {
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied()))
            .expect("parses")
            .etcd
    }

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            for (name, text) in [
                ("ca.pem", CERT),
                ("cert.pem", CERT),
                ("key.pem", KEY),
                ("password", "s3cret\n"),
                ("empty", ""),
            ] {
                std::fs::write(dir.path().join(name), text).expect("write");
            }
            Self { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }
    }

    fn refused(args: &EtcdArgs, env_password: Option<&str>) -> String {
        let err = args
            .security
            .resolve(&args.etcd_endpoints, env_password.map(String::from))
            .expect_err("refused");
        assert!(matches!(err, RegistryError::Config(_)), "{err:?}");
        err.to_string()
    }

    #[test]
    fn plaintext_without_flags_is_the_default() {
        let args = parse(&[]);
        let s = args
            .security
            .resolve(&args.etcd_endpoints, None)
            .expect("ok");
        assert!(s.tls.is_none() && s.auth.is_none());
    }

    #[test]
    fn https_with_ca_and_client_cert_reads_the_files() {
        let f = Files::new();
        let args = parse(&[
            "--etcd-endpoints=https://a:2379,https://b:2379",
            &format!("--etcd-ca-file={}", f.path("ca.pem")),
            &format!("--etcd_cert_file={}", f.path("cert.pem")),
            &format!("--etcd-key-file={}", f.path("key.pem")),
            "--etcd-tls-server-name=etcd.internal",
            "--etcd-user=aspire-worker",
            &format!("--etcd-password-file={}", f.path("password")),
        ]);
        let s = args
            .security
            .resolve(&args.etcd_endpoints, None)
            .expect("ok");
        let tls = s.tls.expect("tls");
        assert_eq!(tls.ca_pem, CERT.as_bytes());
        assert_eq!(
            tls.client_identity,
            Some((CERT.as_bytes().to_vec(), KEY.as_bytes().to_vec()))
        );
        assert_eq!(tls.server_name.as_deref(), Some("etcd.internal"));
        let auth = s.auth.expect("auth");
        assert_eq!(auth.user(), "aspire-worker");
        // The trailing newline is not part of the password.
        assert_eq!(auth.password(), "s3cret");
    }

    #[test]
    fn https_without_a_ca_names_the_flag() {
        let err = refused(&parse(&["--etcd-endpoints=https://a:2379"]), None);
        assert!(err.contains("--etcd-ca-file is not set"), "{err}");
    }

    #[test]
    fn tls_flags_with_plaintext_endpoints_are_refused() {
        let f = Files::new();
        let err = refused(
            &parse(&[&format!("--etcd-ca-file={}", f.path("ca.pem"))]),
            None,
        );
        assert!(err.contains("--etcd-ca-file is set"), "{err}");
        assert!(err.contains("https://"), "{err}");
        let err = refused(&parse(&["--etcd-tls-server-name=x"]), None);
        assert!(err.contains("--etcd-tls-server-name"), "{err}");
    }

    #[test]
    fn a_cert_without_its_key_and_a_key_without_its_cert_are_refused() {
        let f = Files::new();
        let ca = format!("--etcd-ca-file={}", f.path("ca.pem"));
        let err = refused(
            &parse(&[
                "--etcd-endpoints=https://a:1",
                &ca,
                &format!("--etcd-cert-file={}", f.path("cert.pem")),
            ]),
            None,
        );
        assert!(err.contains("--etcd-key-file is not"), "{err}");
        let err = refused(
            &parse(&[
                "--etcd-endpoints=https://a:1",
                &ca,
                &format!("--etcd-key-file={}", f.path("key.pem")),
            ]),
            None,
        );
        assert!(err.contains("--etcd-cert-file is not"), "{err}");
    }

    #[test]
    fn unreadable_or_wrong_pem_files_name_the_flag_and_path() {
        let f = Files::new();
        let missing = f.path("nope.pem");
        let err = refused(
            &parse(&[
                "--etcd-endpoints=https://a:1",
                &format!("--etcd-ca-file={missing}"),
            ]),
            None,
        );
        assert!(err.contains("cannot read --etcd-ca-file") && err.contains(&missing));
        // A key given as the certificate (swapped files).
        let err = refused(
            &parse(&[
                "--etcd-endpoints=https://a:1",
                &format!("--etcd-ca-file={}", f.path("key.pem")),
            ]),
            None,
        );
        assert!(err.contains("no PEM \"CERTIFICATE\" block"), "{err}");
    }

    #[test]
    fn passwords_need_a_user_and_users_need_one_password() {
        let f = Files::new();
        let err = refused(&parse(&["--etcd-user=w"]), None);
        assert!(
            err.contains("--etcd-password-file") && err.contains(PASSWORD_ENV),
            "{err}"
        );
        let err = refused(&parse(&[]), Some("pw"));
        assert!(err.contains("--etcd-user is not"), "{err}");
        let file = format!("--etcd-password-file={}", f.path("password"));
        let err = refused(&parse(&["--etcd-user=w", &file]), Some("pw"));
        assert!(err.contains("one way only"), "{err}");
        let empty = format!("--etcd-password-file={}", f.path("empty"));
        let err = refused(&parse(&["--etcd-user=w", &empty]), None);
        assert!(err.contains("password is empty"), "{err}");
        // The environment alone works.
        let args = parse(&["--etcd-user=w"]);
        let s = args
            .security
            .resolve(&args.etcd_endpoints, Some("from-env".into()))
            .expect("ok");
        assert_eq!(s.auth.expect("auth").password(), "from-env");
    }

    #[test]
    fn there_is_no_flag_carrying_the_password_itself() {
        let err = Cli::try_parse_from(["test", "--etcd-password=pw"]).expect_err("no such flag");
        assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument);
    }
}
