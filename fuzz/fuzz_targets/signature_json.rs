//! libFuzzer entry point; the checks are in [`aspire_fuzz::signature_json`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aspire_fuzz::signature_json::check(data));
