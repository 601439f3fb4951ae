//! TensorFlow Serving's `--ssl_config_file`: a text-format `tensorflow.serving.SSLConfig`
//! whose fields hold PEM text, checked and turned into a rustls `ServerConfig`.

use std::path::Path;
use std::sync::Arc;

use aspire_proto::serving::SslConfig;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;

use crate::error::TlsError;
use crate::pem;

/// The protobuf name of the file's message.
pub const SSL_CONFIG_MESSAGE: &str = "tensorflow.serving.SSLConfig";

/// The ALPN protocol offered: gRPC clients (grpc-core, tonic) require HTTP/2 by ALPN.
const ALPN_H2: &[u8] = b"h2";

/// Reads `path` and builds its server config; also returns the bytes read, so a poller
/// can tell a later change.
pub fn load_server_config(path: &Path) -> Result<(Vec<u8>, Arc<ServerConfig>), TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        flag: "--ssl_config_file",
        path: path.to_path_buf(),
        source,
    })?;
    let config = server_config_from_bytes(path, &bytes)?;
    Ok((bytes, Arc::new(config)))
}

/// Builds the server config that the SSL config file `path` with contents `bytes`
/// describes. With `client_verify`, clients must present a certificate signed by
/// `custom_ca`; without it no client certificate is asked for (as TensorFlow Serving).
pub fn server_config_from_bytes(path: &Path, bytes: &[u8]) -> Result<ServerConfig, TlsError> {
    let parse_error = |message: String| TlsError::Parse {
        path: path.to_path_buf(),
        message,
    };
    let field_error = |field: &'static str| {
        move |message: String| TlsError::Field {
            path: path.to_path_buf(),
            field,
            message,
        }
    };
    let text = std::str::from_utf8(bytes).map_err(|e| parse_error(format!("not UTF-8: {e}")))?;
    let ssl: SslConfig =
        aspire_proto::parse_text_format(SSL_CONFIG_MESSAGE, text).map_err(parse_error)?;

    if ssl.server_cert.trim().is_empty() {
        return Err(field_error("server_cert")(
            "is empty; it must hold the server's certificate chain as PEM text".into(),
        ));
    }
    if ssl.server_key.trim().is_empty() {
        return Err(field_error("server_key")(
            "is empty; it must hold the server's private key as PEM text".into(),
        ));
    }
    let chain =
        pem::certificates(ssl.server_cert.as_bytes()).map_err(field_error("server_cert"))?;
    let key = pem::private_key(ssl.server_key.as_bytes()).map_err(field_error("server_key"))?;
    let provider = pem::provider();
    pem::check_pair(&chain, &key, &provider).map_err(field_error("server_key / server_cert"))?;

    let roots = if ssl.custom_ca.trim().is_empty() {
        None
    } else {
        Some(pem::root_store(ssl.custom_ca.as_bytes()).map_err(field_error("custom_ca"))?)
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| field_error("server_cert")(format!("no TLS version usable: {e}")))?;
    let builder = match (ssl.client_verify, roots) {
        (true, None) => {
            return Err(field_error("custom_ca")(
                "is empty but client_verify is true; give the PEM of the CA that signs client \
                 certificates, or set client_verify: false"
                    .into(),
            ));
        }
        (true, Some(roots)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| {
                    field_error("custom_ca")(format!("cannot verify clients with it: {e}"))
                })?;
            builder.with_client_cert_verifier(verifier)
        }
        (false, _) => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| field_error("server_key / server_cert")(e.to_string()))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestCa, quote, ssl_config_text};

    fn build(text: &str) -> Result<ServerConfig, String> {
        server_config_from_bytes(Path::new("/etc/ssl.cfg"), text.as_bytes())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_valid_file_builds_a_config_offering_h2() {
        let ca = TestCa::new("ca");
        let server = ca.issue(&["127.0.0.1"]);
        let config = build(&ssl_config_text(&server, None, false)).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        build(&ssl_config_text(&server, Some(&ca.cert_pem()), true)).unwrap();
    }

    #[test]
    fn each_bad_field_is_named_with_the_file() {
        let ca = TestCa::new("ca");
        let server = ca.issue(&["127.0.0.1"]);
        let other = ca.issue(&["127.0.0.1"]);
        let swapped = crate::testing::Pair {
            cert: server.cert.clone(),
            key: other.key.clone(),
        };
        let garbled = crate::testing::Pair {
            cert: server.cert.replace("MII", "M!I"),
            key: server.key.clone(),
        };
        let no_key = format!("server_cert: {}\n", quote(&server.cert));
        let cases = [
            (
                ssl_config_text(&swapped, None, false),
                "field server_key / server_cert: the private key does not match",
            ),
            (ssl_config_text(&garbled, None, false), "field server_cert"),
            (
                ssl_config_text(&server, None, true),
                "field custom_ca: is empty but client_verify is true",
            ),
            (
                ssl_config_text(&server, Some("not a certificate"), true),
                "field custom_ca: holds no certificate",
            ),
            (no_key, "field server_key: is empty"),
            (
                "server_key: 3\n".to_string(),
                "not a text-format tensorflow.serving.SSLConfig",
            ),
            (
                "server_pem: \"x\"\n".to_string(),
                "not a text-format tensorflow.serving.SSLConfig",
            ),
        ];
        for (text, expected) in cases {
            let err = build(&text).unwrap_err();
            assert!(err.contains("/etc/ssl.cfg"), "{err}");
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        }
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = load_server_config(Path::new("/nonexistent/ssl.cfg"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--ssl_config_file /nonexistent/ssl.cfg: cannot read"),
            "{err}"
        );
    }
}
