//! The worker: it watches the registry for the versions each model should serve, loads
//! them from storage into LibTorch, batches concurrent requests, and answers TensorFlow
//! Serving's gRPC API (`PredictionService`, `ModelService`, gRPC health).
//!
//! - [`tensor`]: tensors as bytes on the host, the currency between the layers;
//! - [`codec`]: `TensorProto` to and from [`tensor::HostTensor`], checked against the signature;
//! - [`model`]: the LibTorch runtime, the only module that imports `tch`;
//! - [`batcher`]: the queue and batch threads of one loaded version;
//! - [`version_manager`]: which versions are loaded, loading and unloading them;
//! - [`storage_roots`]: the only places versions are loaded from, checked before a fetch;
//! - [`service`]: the gRPC services;
//! - [`error`]: the one table from errors to gRPC status codes.

pub mod app;
pub mod batcher;
pub mod codec;
pub mod config;
pub mod error;
pub mod model;
pub mod record_writer;
pub mod server;
pub mod service;
pub mod storage_roots;
pub mod tensor;
pub mod version_manager;
