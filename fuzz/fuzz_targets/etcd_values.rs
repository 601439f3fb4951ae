//! libFuzzer entry point; the checks are in [`aspire_fuzz::etcd_values`].

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| aspire_fuzz::etcd_values::check(data));
