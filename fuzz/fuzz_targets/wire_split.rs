//! libFuzzer entry point; the checks are in [`aspire_fuzz::wire_split`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aspire_fuzz::wire_split::check(data));
