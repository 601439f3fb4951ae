//! Aspire's shared vocabulary: model names and versions, version policies, tensor data
//! types and signatures, the registry's records, and the registry key schema. Every role
//! (discovery, worker, router, `aspirectl`) speaks in these types; none of them formats a
//! registry key by hand.

pub mod dtype;
pub mod hop;
pub mod keys;
pub mod model;
pub mod records;
pub mod signature;
pub mod version_policy;

pub use dtype::DType;
pub use model::{ModelName, Version};
pub use records::{
    AspiredVersions, AvailableVersion, AvailableVersions, ClusterState, Desired, DesiredSource,
    ModelState, SlowPasses, VersionState, VersionStatus, WorkerRecord,
};
pub use signature::{Signature, SignatureMap, TensorSpec};
pub use version_policy::VersionPolicy;
