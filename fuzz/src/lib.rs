//! The checks behind Aspire's fuzz targets, one module per target. Each `check` takes the
//! fuzzer's bytes, feeds them to one parser of untrusted input and asserts what must hold
//! for any input: no panic, and the invariants named in the module's docs. They live in
//! a library so that `cargo test` in this folder replays the seed corpus through them
//! without libFuzzer.

pub mod etcd_values;
pub mod signature_json;
pub mod tensor_codec;
pub mod text_config;
pub mod wire_split;
