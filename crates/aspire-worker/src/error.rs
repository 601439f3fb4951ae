//! The worker's errors and the one table that maps them to gRPC status codes.

use aspire_core::model::list_versions;
use aspire_core::{ModelName, Version};
use tonic::Status;

use crate::batcher::BatchError;

pub use aspire_core::hop::{DEFAULT_VERSION_TRAILER, FORWARDED_HEADER, UNLOADING_TRAILER};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The request is malformed or does not match the signature.
    #[error("{0}")]
    InvalidArgument(String),
    /// No model of that name is served.
    #[error("model '{model}' is not served here; models served: {}", if .served.is_empty() { "none".to_string() } else { .served.join(", ") })]
    ModelNotFound {
        /// The name asked for.
        model: String,
        /// The models that are served.
        served: Vec<String>,
    },
    /// The model is known but the wanted version is not AVAILABLE.
    #[error("{what}; available versions of model '{model}': {available}", available = list_versions(.available.iter().copied()))]
    VersionNotFound {
        /// The model.
        model: ModelName,
        /// What was asked for and its state, as a phrase.
        what: String,
        /// The versions that are AVAILABLE.
        available: Vec<Version>,
    },
    /// The version's queue is full; the client should back off and retry.
    #[error("{0}")]
    QueueFull(String),
    /// A memory budget (the worker's in-flight bytes) has no room for the request; it is
    /// shed at once, and a router may try another worker.
    #[error("{0}")]
    Overloaded(String),
    /// The deadline passed before the request ran.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The model failed on a valid request.
    #[error("{0}")]
    Internal(String),
    /// The version is going away or the server is shutting down; retry elsewhere.
    #[error("{0}")]
    Unavailable(String),
    /// A request a router forwarded names a version this worker is unloading, or has
    /// unloaded. Not an error of the worker nor of the request: the router's view lags.
    /// Sent as UNAVAILABLE with the [`UNLOADING_TRAILER`] (and, when the model has one,
    /// [`DEFAULT_VERSION_TRAILER`]) so that the router picks again instead of marking the
    /// worker down; clients never see it.
    #[error("version {version} of model '{model}' is being unloaded on this worker")]
    VersionUnloading {
        /// The model.
        model: ModelName,
        /// The version asked for.
        version: Version,
        /// The version a request without one would get here now, if any.
        default_version: Option<Version>,
    },
    /// A method Aspire does not implement.
    #[error("{0}")]
    Unimplemented(String),
}

impl From<WorkerError> for Status {
    /// The only place gRPC codes are chosen. A full queue is RESOURCE_EXHAUSTED, not
    /// UNAVAILABLE: the server is up and will take the request later, and routers treat
    /// UNAVAILABLE as "this worker went away".
    fn from(e: WorkerError) -> Status {
        let msg = e.to_string();
        match e {
            WorkerError::InvalidArgument(_) => Status::invalid_argument(msg),
            WorkerError::ModelNotFound { .. } | WorkerError::VersionNotFound { .. } => {
                Status::not_found(msg)
            }
            WorkerError::QueueFull(_) | WorkerError::Overloaded(_) => {
                Status::resource_exhausted(msg)
            }
            WorkerError::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            WorkerError::Internal(_) => Status::internal(msg),
            WorkerError::Unavailable(_) => Status::unavailable(msg),
            WorkerError::VersionUnloading {
                version,
                default_version,
                ..
            } => {
                let mut metadata = tonic::metadata::MetadataMap::new();
                metadata.insert(UNLOADING_TRAILER, version.as_i64().into());
                if let Some(v) = default_version {
                    metadata.insert(DEFAULT_VERSION_TRAILER, v.as_i64().into());
                }
                Status::with_metadata(tonic::Code::Unavailable, msg, metadata)
            }
            WorkerError::Unimplemented(_) => Status::unimplemented(msg),
        }
    }
}

impl From<BatchError> for WorkerError {
    fn from(e: BatchError) -> Self {
        let msg = e.to_string();
        match e {
            BatchError::QueueFull { .. } | BatchError::QueueBytesFull { .. } => {
                WorkerError::QueueFull(msg)
            }
            BatchError::TooLarge { .. } => WorkerError::InvalidArgument(msg),
            BatchError::DeadlineExceeded => WorkerError::DeadlineExceeded(msg),
            BatchError::Model(_) => WorkerError::Internal(msg),
            BatchError::ShuttingDown | BatchError::VersionDropped => WorkerError::Unavailable(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes() {
        let m = ModelName::new("mnist").unwrap();
        let nf = WorkerError::VersionNotFound {
            model: m,
            what: "version 3 is not loaded".into(),
            available: vec![Version::new(1).unwrap(), Version::new(2).unwrap()],
        };
        let s = Status::from(nf);
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(
            s.message(),
            "version 3 is not loaded; available versions of model 'mnist': 1, 2"
        );
        let full = BatchError::QueueFull {
            rows: 10,
            capacity: 10,
        };
        assert_eq!(
            Status::from(WorkerError::from(full)).code(),
            Code::ResourceExhausted
        );
        let big = BatchError::TooLarge { rows: 100, max: 32 };
        assert_eq!(
            Status::from(WorkerError::from(big)).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            Status::from(WorkerError::from(BatchError::DeadlineExceeded)).code(),
            Code::DeadlineExceeded
        );
    }
}
