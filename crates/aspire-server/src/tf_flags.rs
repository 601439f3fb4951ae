//! TensorFlow Serving flags that Aspire accepts but does not implement yet. A user's
//! `tensorflow_model_server` command line must start `aspire-server` unchanged, so these
//! are taken out of the arguments before parsing and each is logged as a warning.

use std::ffi::OsString;

/// `tensorflow_model_server` flags Aspire does not implement (snake_case).
pub const UNIMPLEMENTED: &[&str] = &[
    "rest_api_port",
    "rest_api_num_threads",
    "rest_api_timeout_in_ms",
    "rest_api_enable_cors_support",
    "grpc_socket_path",
    "grpc_channel_arguments",
    "grpc_max_threads",
    "enable_model_warmup",
    "monitoring_config_file",
    "platform_config_file",
    "per_process_gpu_memory_fraction",
    "saved_model_tags",
    "tensorflow_session_parallelism",
    "tensorflow_session_config_file",
    "enable_signature_method_name_check",
    "xla_cpu_compilation_enabled",
    "max_num_load_retries",
    "load_retry_interval_micros",
    "flush_filesystem_caches",
    "allow_version_labels_for_unavailable_models",
    "num_load_threads",
    "num_unload_threads",
    "enable_profiler",
    "remove_unused_fields_from_bundle_metagraph",
    "prefer_tflite_model",
    "use_tflite_model",
    "thread_pool_factory_config_file",
    "mixed_precision",
    "skip_initialize_tpu",
    "enable_grpc_healthcheck_service",
    "version",
];

/// Flags above that take no value when given bare (`--enable_model_warmup`).
const BOOLEAN: &[&str] = &[
    "rest_api_enable_cors_support",
    "enable_model_warmup",
    "enable_signature_method_name_check",
    "xla_cpu_compilation_enabled",
    "flush_filesystem_caches",
    "allow_version_labels_for_unavailable_models",
    "enable_profiler",
    "remove_unused_fields_from_bundle_metagraph",
    "prefer_tflite_model",
    "use_tflite_model",
    "skip_initialize_tpu",
    "enable_grpc_healthcheck_service",
    "version",
];

/// Splits `args` (program name first) into those to parse and the names of the
/// unimplemented flags that were dropped, with their values.
pub fn strip_unimplemented(args: Vec<OsString>) -> (Vec<OsString>, Vec<String>) {
    let mut kept = Vec::with_capacity(args.len());
    let mut dropped = Vec::new();
    let mut iter = args.into_iter().peekable();
    while let Some(arg) = iter.next() {
        let Some(text) = arg.to_str() else {
            kept.push(arg);
            continue;
        };
        let Some(flag) = text
            .strip_prefix("--")
            .or_else(|| text.strip_prefix('-').filter(|f| f.len() > 1))
        else {
            kept.push(arg);
            continue;
        };
        let (name, inline_value) = match flag.split_once('=') {
            Some((n, v)) => (n.replace('-', "_"), Some(v.to_string())),
            None => (flag.replace('-', "_"), None),
        };
        // `--version` is Aspire's own when it stands alone.
        if !UNIMPLEMENTED.contains(&name.as_str()) || (name == "version" && inline_value.is_none())
        {
            kept.push(arg);
            continue;
        }
        let value = match inline_value {
            Some(v) => Some(v),
            None if !BOOLEAN.contains(&name.as_str()) => iter
                .next_if(|next| next.to_str().is_some_and(|n| !n.starts_with('-')))
                .and_then(|v| v.into_string().ok()),
            None => None,
        };
        dropped.push(match value {
            Some(v) => format!("--{name}={v}"),
            None => format!("--{name}"),
        });
    }
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn drops_unimplemented_flags_with_their_values() {
        let (kept, dropped) = strip_unimplemented(os(&[
            "aspire-server",
            "--rest_api_port=8501",
            "--port=9000",
            "--rest-api-num-threads",
            "4",
            "--enable_model_warmup",
            "--model_name=mnist",
            "-monitoring_config_file",
            "/etc/mon.txt",
        ]));
        assert_eq!(
            kept,
            os(&["aspire-server", "--port=9000", "--model_name=mnist"])
        );
        assert_eq!(
            dropped,
            vec![
                "--rest_api_port=8501",
                "--rest_api_num_threads=4",
                "--enable_model_warmup",
                "--monitoring_config_file=/etc/mon.txt"
            ]
        );
    }

    #[test]
    fn keeps_own_version_flag() {
        let (kept, dropped) = strip_unimplemented(os(&["s", "--version"]));
        assert_eq!((kept.len(), dropped.len()), (2, 0));
    }
}
