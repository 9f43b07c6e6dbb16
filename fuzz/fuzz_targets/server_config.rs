//! `RUSTC_BOOTSTRAP=1 cargo fuzz run server_config`: see [`upcoach_fuzz::server_config`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upcoach_fuzz::server_config(data));
