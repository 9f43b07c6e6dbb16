//! `RUSTC_BOOTSTRAP=1 cargo fuzz run facebook_signed_request`: see [`upcoach_fuzz::facebook_signed_request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upcoach_fuzz::facebook_signed_request(data));
