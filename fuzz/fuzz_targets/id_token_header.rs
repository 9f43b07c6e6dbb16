//! `RUSTC_BOOTSTRAP=1 cargo fuzz run id_token_header`: see [`upcoach_fuzz::id_token_header`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upcoach_fuzz::id_token_header(data));
