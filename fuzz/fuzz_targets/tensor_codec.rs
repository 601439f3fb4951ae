//! libFuzzer entry point; the checks are in [`aspire_fuzz::tensor_codec`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aspire_fuzz::tensor_codec::check(data));
