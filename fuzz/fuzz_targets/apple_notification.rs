//! `RUSTC_BOOTSTRAP=1 cargo fuzz run apple_notification`: see [`upcoach_fuzz::apple_notification`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upcoach_fuzz::apple_notification(data));
