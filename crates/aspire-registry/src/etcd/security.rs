//! How an etcd client checks whom it talks to and proves who it is: TLS (the CA that
//! signed etcd's server certificate, optionally a client certificate for etcd's
//! `--client-cert-auth`, optionally the name to expect on the server certificate) and an
//! etcd user with its password. Holds PEM bytes, not paths: reading files and naming the
//! flags they came from is [`crate::cli::EtcdArgs`]'s job.

use std::fmt;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::{RegistryError, Result};

/// TLS and authentication settings of an etcd client. The default is plaintext without
/// authentication, which is what `http://` endpoints need.
#[derive(Debug, Clone, Default)]
pub struct EtcdSecurity {
    /// TLS settings; required for `https://` endpoints and refused with `http://` ones.
    pub tls: Option<EtcdTls>,
    /// The etcd user to authenticate as; `None` sends no credentials (etcd with
    /// `--client-cert-auth` then takes the user from the client certificate's common name).
    pub auth: Option<EtcdAuth>,
}

/// TLS settings for `https://` etcd endpoints.
#[derive(Clone)]
pub struct EtcdTls {
    /// PEM of the CA (or CAs) that signed etcd's server certificate. Only these are
    /// trusted: no system roots.
    pub ca_pem: Vec<u8>,
    /// PEM certificate chain and private key this client presents, for an etcd started
    /// with `--client-cert-auth`.
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name expected on etcd's certificate, when it differs from the endpoint's host
    /// (e.g. endpoints given as IP addresses while the certificate names a DNS name).
    pub server_name: Option<String>,
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key stays out of logs; whether there is one is what a reader needs.
        f.debug_struct("EtcdTls")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("client_identity", &self.client_identity.is_some())
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// An etcd user and its password. `Debug` does not show the password.
#[derive(Clone)]
pub struct EtcdAuth {
    user: String,
    password: String,
}

impl EtcdAuth {
    /// A user and its password.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            user: user.into(),
            password: password.into(),
        }
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    #[cfg(test)]
    pub(crate) fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Whether an endpoint asks for TLS. Endpoints without a scheme are plaintext, as
/// etcd-client treats them when no TLS is configured.
pub(crate) fn is_https(endpoint: &str) -> bool {
    endpoint
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

impl EtcdSecurity {
    /// Checks that the endpoints and the TLS settings agree: all `https://` with TLS, or
    /// all plaintext without. Nothing ever falls back to plaintext silently.
    pub(crate) fn check(&self, endpoints: &[String]) -> Result<()> {
        let https: Vec<&String> = endpoints.iter().filter(|e| is_https(e)).collect();
        if !https.is_empty() && https.len() != endpoints.len() {
            return Err(RegistryError::Config(format!(
                "etcd endpoints {} mix https:// and plaintext; use https:// for all of them \
                 (or none)",
                endpoints.join(",")
            )));
        }
        match (&self.tls, https.is_empty()) {
            (None, false) => Err(RegistryError::Config(format!(
                "etcd endpoints {} use https:// but no CA is configured to check etcd's \
                 certificate; give the PEM CA that signed it",
                endpoints.join(",")
            ))),
            (Some(_), true) => Err(RegistryError::Config(format!(
                "TLS settings are given but etcd endpoints {} are plaintext; use https:// \
                 endpoints, or drop the TLS settings",
                endpoints.join(",")
            ))),
            _ => Ok(()),
        }
    }

    /// Adds TLS and credentials to etcd-client's options.
    pub(crate) fn apply(&self, mut options: ConnectOptions) -> ConnectOptions {
        if let Some(tls) = &self.tls {
            let mut config = TlsOptions::new()
                .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                // etcd 3.4 does not always offer h2 by ALPN; it speaks HTTP/2 regardless.
                .assume_http2(true);
            if let Some((cert, key)) = &tls.client_identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(name) = &tls.server_name {
                config = config.domain_name(name.clone());
            }
            options = options.with_tls(config);
        }
        if let Some(auth) = &self.auth {
            // etcd's simple tokens expire (300 s unused by default) and vanish when etcd
            // restarts; with this, a call refused for an invalid token authenticates
            // again and is retried once.
            options = options
                .with_user(auth.user.clone(), auth.password.clone())
                .with_auto_token_refresh(true);
        }
        options
    }

    /// Who this client is to etcd, for error sentences.
    pub(crate) fn who(&self) -> String {
        match (&self.auth, &self.tls) {
            (Some(auth), _) => format!("user '{}'", auth.user),
            (None, Some(tls)) if tls.client_identity.is_some() => {
                "the user named by this client certificate's common name".to_string()
            }
            (None, _) => "this unauthenticated client".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls() -> EtcdTls {
        EtcdTls {
            ca_pem: b"ca".to_vec(),
            client_identity: Some((b"cert".to_vec(), b"secret key".to_vec())),
            server_name: None,
        }
    }

    fn eps(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn https_needs_tls_and_tls_needs_https() {
        let plain = EtcdSecurity::default();
        let secure = EtcdSecurity {
            tls: Some(tls()),
            auth: None,
        };
        assert!(plain.check(&eps(&["http://a:1", "b:2"])).is_ok());
        assert!(secure.check(&eps(&["https://a:1", "HTTPS://b:2"])).is_ok());
        let err = plain.check(&eps(&["https://a:1"])).expect_err("no CA");
        assert!(err.to_string().contains("no CA"), "{err}");
        let err = secure.check(&eps(&["http://a:1"])).expect_err("plaintext");
        assert!(err.to_string().contains("plaintext"), "{err}");
        let err = secure
            .check(&eps(&["https://a:1", "http://b:2"]))
            .expect_err("mixed");
        assert!(err.to_string().contains("mix"), "{err}");
    }

    #[test]
    fn debug_hides_the_password_and_key() {
        let s = EtcdSecurity {
            tls: Some(tls()),
            auth: Some(EtcdAuth::new("worker", "hunter2")),
        };
        let text = format!("{s:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("secret key"), "{text}");
        assert!(text.contains("worker"), "{text}");
    }

    #[test]
    fn errors_name_who_was_denied() {
        let user = EtcdSecurity {
            tls: None,
            auth: Some(EtcdAuth::new("worker", "pw")),
        };
        assert_eq!(user.who(), "user 'worker'");
        let cn = EtcdSecurity {
            tls: Some(tls()),
            auth: None,
        };
        assert!(cn.who().contains("common name"));
    }
}
