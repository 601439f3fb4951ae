//! TensorFlow Serving's MNIST tutorial, redone for Aspire with TorchScript:
//!
//! - [`data`] loads the 5,000-image MNIST CSV and splits it into training and test rows;
//! - [`export`] trains a classifier and writes it as a model version (`mnist-export`,
//!   the counterpart of `mnist_saved_model.py`);
//! - [`client`] sends the test images to a server over TensorFlow Serving's gRPC API and
//!   reports the inference error rate (`mnist-client`, the counterpart of `mnist_client.py`).
//!
//! The binaries only parse flags and call [`train_and_export`] or [`run_client`], so tests
//! drive the same code in-process.

pub mod client;
pub mod data;
pub mod error;
pub mod export;

pub use client::{ClientOptions, ClientReport, Encoding, run_client};
pub use data::{MnistData, Split};
pub use error::{Error, Result};
pub use export::{ExportOptions, ExportReport, train_and_export};
