//! Compiles the protos under the workspace's `proto/` folder.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "tensorflow_serving/apis/prediction_service.proto",
        "tensorflow_serving/apis/model_service.proto",
        "tensorflow_serving/config/model_server_config.proto",
        "tensorflow_serving/config/batching_parameters.proto",
        "tensorflow_serving/config/ssl_config.proto",
    ];
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Tensor bytes stay `Bytes`, so decoding a request does not copy them.
        .bytes(".tensorflow.TensorProto.tensor_content")
        .file_descriptor_set_path(out.join("descriptor_set.bin"))
        .compile_protos(&files.map(|f| root.join(f)), std::slice::from_ref(&root))?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
