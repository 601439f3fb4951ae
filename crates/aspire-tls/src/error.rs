//! The crate's one error type. Every message names the file, and the field or flag, that
//! was wrong, and what would be right.

use std::path::PathBuf;

/// Why TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{flag} {path}: cannot read the file: {source}")]
    Read {
        /// The flag that named the file.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// `--ssl_config_file` is not a text-format `tensorflow.serving.SSLConfig`.
    #[error(
        "--ssl_config_file {path}: not a text-format tensorflow.serving.SSLConfig \
         (fields server_key, server_cert, custom_ca, client_verify): {message}"
    )]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said.
        message: String,
    },
    /// A field of the SSL config file holds something unusable.
    #[error("--ssl_config_file {path}: field {field}: {message}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field (or fields) at fault.
        field: &'static str,
        /// What was wrong and what would be right.
        message: String,
    },
    /// A client TLS flag (the router's `--worker-tls-*`) is unusable.
    #[error("{flag}: {message}")]
    Flag {
        /// The flag (or flags) at fault.
        flag: &'static str,
        /// What was wrong and what would be right.
        message: String,
    },
}
