//! `RUSTC_BOOTSTRAP=1 cargo fuzz run cache_envelope`: see [`upcoach_fuzz::cache_envelope`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upcoach_fuzz::cache_envelope(data));
