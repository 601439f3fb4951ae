//! Discovery: finds the model versions in storage and tells the registry about them.
//!
//! For each configured model ([`model_config`]) a [`StoragePoller`] lists the model's
//! base path ([`storage`]): every subdirectory named by a positive integer is a version,
//! complete once it holds `model.pt` and stops changing. The complete versions are
//! published as the model's `available` key and those its version policy selects as its
//! `aspired` key; workers load the aspired ones, copying them with [`fetch_version`].
//!
//! ```text
//! /models/mnist/            base_path
//!     1/model.pt            version 1
//!     2/model.pt            version 2, with its signatures
//!     2/signature.json
//!     tmp/                  ignored (logged once)
//! ```

pub mod error;
pub mod model_config;
mod model_watch;
pub mod service;
pub mod storage;
pub mod storage_poller;

pub use error::DiscoveryError;
pub use model_config::{ModelConfig, parse_model_config_file};
pub use model_watch::{MODEL_FILE, SIGNATURE_FILE};
pub use storage::{StorageLocation, fetch_version};
pub use storage_poller::{ModelsHandle, StoragePoller};
