//! TensorFlow Serving's text-format configs: `--model_config_file`
//! ([`aspire_discovery::model_config::parse_model_config_file`]) and
//! `--batching_parameters_file` ([`aspire_proto::parse_text_format`] of
//! `tensorflow.serving.BatchingParameters`).
//!
//! Every input (read as UTF-8, invalid sequences replaced) goes to both parsers. Neither
//! panics. Accepted model configs have unique valid names, non-empty base paths, positive
//! version labels and a policy that selects among versions without panicking: `latest`
//! of at least one, `specific` of at least one version, ascending. Accepted batching
//! parameters, printed as text format, parse to the same message.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use aspire_core::{Version, VersionPolicy};
use aspire_discovery::model_config::parse_model_config_file;
use aspire_proto::serving::BatchingParameters;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

const BATCHING: &str = "tensorflow.serving.BatchingParameters";

/// Checks one input (see the module docs).
pub fn check(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_model_config(&text);
    check_batching(&text);
}

fn check_model_config(text: &str) {
    let Ok(models) = parse_model_config_file(text) else {
        return;
    };
    let names: BTreeSet<_> = models.iter().map(|m| &m.name).collect();
    assert_eq!(names.len(), models.len(), "duplicate model names");
    let some_versions: Vec<Version> = [1, 2, 3, 7].into_iter().filter_map(Version::new).collect();
    for m in &models {
        assert!(
            !m.base_path.trim().is_empty(),
            "{}: empty base_path",
            m.name
        );
        for (label, v) in &m.version_labels {
            assert!(!label.is_empty());
            assert!(v.get() >= 1);
        }
        match &m.policy {
            VersionPolicy::Latest(n) => assert!(*n >= 1),
            VersionPolicy::All => {}
            VersionPolicy::Specific(versions) => {
                assert!(!versions.is_empty());
                assert!(versions.windows(2).all(|w| w[0] < w[1]), "{versions:?}");
            }
        }
        let selected = m.policy.select(&some_versions);
        assert!(selected.iter().all(|v| some_versions.contains(v)));
    }
}

fn check_batching(text: &str) {
    let Ok(params) = aspire_proto::parse_text_format::<BatchingParameters>(BATCHING, text) else {
        return;
    };
    static DESCRIPTOR: OnceLock<MessageDescriptor> = OnceLock::new();
    let desc = DESCRIPTOR.get_or_init(|| {
        DescriptorPool::decode(aspire_proto::FILE_DESCRIPTOR_SET)
            .expect("the embedded descriptors decode")
            .get_message_by_name(BATCHING)
            .expect("known message")
    });
    let mut dynamic = DynamicMessage::new(desc.clone());
    dynamic
        .merge(params.encode_to_vec().as_slice())
        .expect("prost's encoding decodes");
    let printed = dynamic.to_text_format();
    let again: BatchingParameters = aspire_proto::parse_text_format(BATCHING, &printed)
        .unwrap_or_else(|e| panic!("{printed:?} does not parse back: {e}"));
    assert_eq!(again, params, "text format round trip of {printed:?}");
}
