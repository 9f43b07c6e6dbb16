//! The upcoach reference server, as an example of the umbrella crate:
//! `cargo run --example server` (add `-- --dev` for `POST /dev/token`).
//!
//! The server itself lives in `examples/server/src` (the `upcoach-server` package) so
//! that its tests can drive it.

fn main() -> std::process::ExitCode {
    upcoach_server::cli_main()
}
