//! `RUSTC_BOOTSTRAP=1 cargo fuzz run server_request`: see [`upcoach_fuzz::server_request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upcoach_fuzz::server_request(data));
