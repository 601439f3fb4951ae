//! TensorFlow Serving's public gRPC API (`tensorflow.serving.PredictionService`,
//! `tensorflow.serving.ModelService`) and its config messages, compiled from the protos in
//! the workspace's `proto/` folder. Field numbers match TensorFlow Serving's published
//! protos, so its clients talk to Aspire unchanged.

#![allow(missing_docs, clippy::doc_markdown, clippy::large_enum_variant)]

pub mod convert;
pub mod grpc_timeout;

/// `tensorflow.*`: tensors, shapes, data types and signatures.
pub mod tensorflow {
    tonic::include_proto!("tensorflow");

    /// `tensorflow.error`: TensorFlow's canonical error codes.
    pub mod error {
        tonic::include_proto!("tensorflow.error");
    }

    /// `tensorflow.serving`: the serving API and config messages.
    pub mod serving {
        tonic::include_proto!("tensorflow.serving");
    }
}

pub use tensorflow::serving;
pub use tensorflow::{DataType, TensorProto, TensorShapeProto};

/// Serialized `FileDescriptorSet` of every compiled proto (with imports), for parsing
/// TensorFlow Serving's text-format config files with `prost-reflect`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/descriptor_set.bin"));

/// Type URL of `SignatureDefMap` inside `google.protobuf.Any`, as TensorFlow Serving sets it.
pub const SIGNATURE_DEF_MAP_TYPE_URL: &str =
    "type.googleapis.com/tensorflow.serving.SignatureDefMap";

/// Parses a text-format protobuf message (TensorFlow Serving's config files) into `T`.
///
/// `full_name` is the message's protobuf name, e.g. `tensorflow.serving.ModelServerConfig`.
pub fn parse_text_format<T: prost::Message + Default>(
    full_name: &str,
    text: &str,
) -> Result<T, String> {
    // Decoded once: it takes milliseconds, which `make fuzz` (text_config) would pay per input.
    static POOL: std::sync::OnceLock<Result<prost_reflect::DescriptorPool, String>> =
        std::sync::OnceLock::new();
    let pool = POOL
        .get_or_init(|| {
            prost_reflect::DescriptorPool::decode(FILE_DESCRIPTOR_SET)
                .map_err(|e| format!("bad embedded descriptor set: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)?;
    let desc = pool
        .get_message_by_name(full_name)
        .ok_or_else(|| format!("unknown message {full_name}"))?;
    let msg =
        prost_reflect::DynamicMessage::parse_text_format(desc, text).map_err(|e| e.to_string())?;
    msg.transcode_to::<T>().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::serving::{BatchingParameters, ModelServerConfig, model_server_config};

    #[test]
    fn parses_tf_serving_model_config_text() {
        let text = r#"
            model_config_list {
              config {
                name: 'mnist'
                base_path: '/models/mnist'
                model_platform: 'tensorflow'
                model_version_policy { specific { versions: 1 versions: 2 } }
              }
              config { name: "other" base_path: "s3://bucket/other" }
            }"#;
        let cfg: ModelServerConfig =
            super::parse_text_format("tensorflow.serving.ModelServerConfig", text).unwrap();
        let Some(model_server_config::Config::ModelConfigList(list)) = cfg.config else {
            panic!("no model_config_list");
        };
        assert_eq!(list.config.len(), 2);
        assert_eq!(list.config[0].name, "mnist");
        assert_eq!(list.config[1].base_path, "s3://bucket/other");
        let policy = list.config[0].model_version_policy.clone().unwrap();
        assert!(format!("{policy:?}").contains("versions: [1, 2]"));
    }

    #[test]
    fn parses_batching_parameters_text() {
        let text = "max_batch_size { value: 32 }\nbatch_timeout_micros { value: 500 }\n\
                    allowed_batch_sizes: 8 allowed_batch_sizes: 32";
        let p: BatchingParameters =
            super::parse_text_format("tensorflow.serving.BatchingParameters", text).unwrap();
        assert_eq!(p.max_batch_size, Some(32));
        assert_eq!(p.batch_timeout_micros, Some(500));
        assert_eq!(p.allowed_batch_sizes, vec![8, 32]);
    }

    #[test]
    fn text_format_error_names_the_field() {
        let err = super::parse_text_format::<BatchingParameters>(
            "tensorflow.serving.BatchingParameters",
            "max_batch_sise { value: 3 }",
        )
        .unwrap_err();
        assert!(err.contains("max_batch_sise"), "{err}");
    }
}
