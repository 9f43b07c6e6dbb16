//! `RUSTC_BOOTSTRAP=1 cargo fuzz run sse_cursor`: see [`upcoach_fuzz::sse_cursor`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upcoach_fuzz::sse_cursor(data));
