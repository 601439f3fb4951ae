//! The one error type of the benchmark library: each variant is a sentence that says what
//! failed and, where it helps, which flag to change.

/// Why a benchmark step failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag's value cannot be used; the sentence names the flag.
    #[error("{0}")]
    InvalidOption(String),
    /// The server under load could not be reached.
    #[error("cannot connect to {address}: {source}")]
    Connect {
        /// The address given with `--server`.
        address: String,
        /// What tonic said.
        source: tonic::transport::Error,
    },
    /// The server answered the check request before the run with an error or an unusable
    /// answer, so the run would only measure failures.
    #[error("the check request to {address} failed: {message}")]
    CheckRequest {
        /// The address given with `--server`.
        address: String,
        /// What went wrong.
        message: String,
    },
    /// The bare server failed.
    #[error("the transport-ceiling server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// LibTorch failed to load or run the model.
    #[error("LibTorch: {0}")]
    Torch(String),
    /// Reading or writing a file (or `/proc`) failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The soak's stack (etcd, discovery, workers, router) could not be started or steered.
    #[error("soak: {0}")]
    Stack(String),
    /// The soak ran and found failed calls, memory growth, faults it could not inject or
    /// roles that exited.
    #[error("the soak failed: {0}")]
    SoakFailed(String),
    /// A results file holds a line that is not a result.
    #[error("{0}")]
    BadResult(String),
}

impl Error {
    /// An [`Error::Io`] that says what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
