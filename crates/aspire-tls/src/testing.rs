//! Test support (the `testing` feature): a throwaway CA that issues server and client
//! certificates, and SSL config files in TensorFlow Serving's text format.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// A certificate and its private key, as PEM text.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The certificate (PEM).
    pub cert: String,
    /// Its private key (PEM, PKCS#8).
    pub key: String,
}

/// A self-signed CA made for one test.
#[derive(Debug)]
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A new CA with its own key, named `name`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("CA key");
        Self {
            issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate"),
        }
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate signed by this CA for `names` (DNS names, or IP addresses, which
    /// become IP address SANs), with a new key.
    pub fn issue(&self, names: &[&str]) -> Pair {
        let names: Vec<String> = names.iter().map(ToString::to_string).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A TensorFlow Serving SSL config file's text: `server` as key and certificate,
/// `custom_ca` when given, and `client_verify`.
pub fn ssl_config_text(server: &Pair, custom_ca: Option<&str>, client_verify: bool) -> String {
    let mut text = format!(
        "server_key: {}\nserver_cert: {}\n",
        quote(&server.key),
        quote(&server.cert)
    );
    if let Some(ca) = custom_ca {
        text.push_str(&format!("custom_ca: {}\n", quote(ca)));
    }
    text.push_str(&format!("client_verify: {client_verify}\n"));
    text
}

/// `s` as a text-format string literal (PEM's newlines escaped).
pub fn quote(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    )
}
