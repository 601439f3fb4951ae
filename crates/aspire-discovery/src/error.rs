//! The crate's error type: why a base path could not be opened, read or copied. Every
//! message is a sentence that names the path it is about.

use std::path::PathBuf;

/// Why a storage operation of discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The base path (or version URL) cannot name a store: bad URL, unknown scheme, or a
    /// scheme this build was compiled without.
    #[error("base path {base_path:?} cannot be used: {reason}")]
    InvalidBasePath {
        /// The path or URL as given.
        base_path: String,
        /// What is wrong and what would be right.
        reason: String,
    },
    /// Listing or reading objects failed (missing permissions, network, ...).
    #[error("could not read {location}: {source}")]
    Storage {
        /// The URL of what was being read.
        location: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// Writing a local copy failed.
    #[error("could not write {}: {source}", path.display())]
    Io {
        /// The local path being written.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A local file of a version directory resolves (through a symlink) outside the roots
    /// the caller allows: refused before anything is read, and refused again on a retry.
    #[error("could not copy {location}: {reason}")]
    OutsideRoots {
        /// The URL of the file as listed.
        location: String,
        /// Where it resolves to, and the roots.
        reason: String,
    },
    /// A version directory holds nothing to copy, or an object with an unusable name.
    #[error("could not copy {location}: {reason}")]
    Fetch {
        /// The URL of the version directory.
        location: String,
        /// What is wrong.
        reason: String,
    },
}

impl DiscoveryError {
    pub(crate) fn storage(location: impl Into<String>, source: object_store::Error) -> Self {
        DiscoveryError::Storage {
            location: location.into(),
            source,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DiscoveryError::Io {
            path: path.into(),
            source,
        }
    }
}
