//! `RUSTC_BOOTSTRAP=1 cargo fuzz run callback_form`: see [`upcoach_fuzz::callback_form`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upcoach_fuzz::callback_form(data));
