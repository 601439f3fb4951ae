//! libFuzzer entry point; the checks are in [`aspire_fuzz::text_config`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aspire_fuzz::text_config::check(data));
