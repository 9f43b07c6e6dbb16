//! The upcoach reference server: `cargo run -p upcoach-server` (or `cargo run --example server`).

fn main() -> std::process::ExitCode {
    upcoach_server::cli_main()
}
