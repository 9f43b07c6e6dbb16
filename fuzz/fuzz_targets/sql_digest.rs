//! `RUSTC_BOOTSTRAP=1 cargo fuzz run sql_digest`: see [`upcoach_fuzz::sql_digest`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upcoach_fuzz::sql_digest(data));
