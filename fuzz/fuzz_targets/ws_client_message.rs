//! `RUSTC_BOOTSTRAP=1 cargo fuzz run ws_client_message`: see [`upcoach_fuzz::ws_client_message`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upcoach_fuzz::ws_client_message(data));
