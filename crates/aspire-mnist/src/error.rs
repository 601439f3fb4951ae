//! The crate's one error type. Every message is a sentence that names the file, flag or
//! server involved and, where there is one, what to do about it.

use std::path::PathBuf;

/// What can go wrong loading data, training, exporting or calling a server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The data file does not exist.
    #[error(
        "MNIST data file {path} not found; run `make setup` to extract it, or point --data (ASPIRE_MNIST_DATA) at it"
    )]
    DataMissing {
        /// The path that was tried.
        path: PathBuf,
    },
    /// A line of the data file is malformed.
    #[error("{path}:{line}: {message}")]
    DataFormat {
        /// The data file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot read".
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The export's version folder already exists.
    #[error(
        "version folder {path} already exists; refusing to overwrite a model version that may be serving (pick another --model-version or remove it)"
    )]
    VersionExists {
        /// The existing folder.
        path: PathBuf,
    },
    /// An option has a value that cannot work.
    #[error("{0}")]
    InvalidOption(String),
    /// LibTorch reported an error while training, tracing or saving.
    #[error("LibTorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The client could not reach the server at all.
    #[error("cannot connect to {endpoint}: {message}; is the server running there?")]
    Connect {
        /// The endpoint tried, e.g. `http://localhost:8500`.
        endpoint: String,
        /// The transport's description of the failure.
        message: String,
    },
}

/// Shorthand for results with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
