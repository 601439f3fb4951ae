//! The router's own errors and the one table that maps them to gRPC status codes.
//!
//! Errors a worker answers with are not here: they go back to the client as they came
//! (see [`crate::forward`]).

use aspire_core::model::list_versions;
use aspire_core::{ModelName, Version};
use tonic::Status;

/// Why the router refused or could not route a request.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The request is malformed (bad wire format, missing or invalid `model_spec`).
    #[error("{0}")]
    InvalidArgument(String),
    /// No model of that name is known to the registry or served by any worker.
    #[error("model '{model}' is not served; models served: {}", if .served.is_empty() { "none".to_string() } else { .served.join(", ") })]
    ModelNotFound {
        /// The name asked for.
        model: String,
        /// The models that are known.
        served: Vec<String>,
    },
    /// The model is known but the wanted version is not AVAILABLE on any worker, or is
    /// not in storage (metadata).
    #[error("{what}; available versions of model '{model}': {available}", available = list_versions(.available.iter().copied()))]
    VersionNotFound {
        /// The model.
        model: ModelName,
        /// What was asked for, as a phrase.
        what: String,
        /// The versions that are AVAILABLE (or, for metadata, in storage).
        available: Vec<Version>,
    },
    /// Nothing that could answer is up: the model or version has workers, but none is
    /// live. The client may retry.
    #[error("{0}")]
    NoLiveWorker(String),
    /// The client's deadline passed before the request could be forwarded.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A method Aspire does not implement.
    #[error("{0}")]
    Unimplemented(String),
}

impl From<RouterError> for Status {
    /// The only place the router chooses codes. No live worker is UNAVAILABLE (not
    /// NOT_FOUND): the model exists and a retry after a worker comes back will succeed.
    fn from(e: RouterError) -> Status {
        let msg = e.to_string();
        match e {
            RouterError::InvalidArgument(_) => Status::invalid_argument(msg),
            RouterError::ModelNotFound { .. } | RouterError::VersionNotFound { .. } => {
                Status::not_found(msg)
            }
            RouterError::NoLiveWorker(_) => Status::unavailable(msg),
            RouterError::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            RouterError::Unimplemented(_) => Status::unimplemented(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn codes_and_sentences() {
        let v = |n| Version::new(n).unwrap();
        let nf = Status::from(RouterError::VersionNotFound {
            model: ModelName::new("mnist").unwrap(),
            what: "version 3 is not AVAILABLE on any worker".into(),
            available: vec![v(1), v(2)],
        });
        assert_eq!(nf.code(), Code::NotFound);
        assert_eq!(
            nf.message(),
            "version 3 is not AVAILABLE on any worker; available versions of model 'mnist': 1, 2"
        );
        let unknown = Status::from(RouterError::ModelNotFound {
            model: "x".into(),
            served: vec!["a".into(), "b".into()],
        });
        assert_eq!(unknown.code(), Code::NotFound);
        assert_eq!(
            unknown.message(),
            "model 'x' is not served; models served: a, b"
        );
        let none = Status::from(RouterError::ModelNotFound {
            model: "x".into(),
            served: vec![],
        });
        assert!(none.message().ends_with("models served: none"));
        for (e, code) in [
            (
                RouterError::InvalidArgument("bad".into()),
                Code::InvalidArgument,
            ),
            (RouterError::NoLiveWorker("down".into()), Code::Unavailable),
            (
                RouterError::DeadlineExceeded("late".into()),
                Code::DeadlineExceeded,
            ),
            (RouterError::Unimplemented("no".into()), Code::Unimplemented),
        ] {
            assert_eq!(Status::from(e).code(), code);
        }
    }
}
