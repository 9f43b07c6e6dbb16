//! The realtime routes through an independent client: `tests/js/realtime/client.mjs`
//! (the npm `ws` and `eventsource` packages) against the reference server in `--dev`
//! mode. Skips with a printed reason when `node` or the script's `node_modules` is
//! missing (`npm ci` in `tests/js/realtime` installs them), unless
//! `UPCOACH_REQUIRE_NODE=1` (set by `.ci/run`) turns the skip into a failure.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::Running;
use upcoach_server::{Options, ServerConfig};

/// Set to `1` to turn a skip for a missing `node` or `node_modules` into a failure.
const REQUIRE_NODE: &str = "UPCOACH_REQUIRE_NODE";
/// How long the script may run (it gives up on its own after 60 s).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `node client.mjs <addr> <token>` in `dir`, killing it after `SCRIPT_TIMEOUT`.
fn run_script(dir: &Path, addr: &str, token: &str) -> support::Finished {
    let mut command = Command::new("node");
    command
        .arg("client.mjs")
        .arg(addr)
        .arg(token)
        .current_dir(dir);
    support::run_script(command, SCRIPT_TIMEOUT)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_client_passes_against_the_reference_server() {
    let dir = support::js_dir("realtime");
    if let Some(reason) = support::node_missing(&dir) {
        let required = std::env::var(REQUIRE_NODE).is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{reason}, but {REQUIRE_NODE}=1: this run must not skip the JS client test"
        );
        eprintln!("skipping: {reason}");
        return;
    }

    let server = Running::start(
        ServerConfig::default(),
        Options {
            dev: true,
            ..Options::default()
        },
    )
    .await;
    let answer = server.post("/dev/token", r#"{"roles":["admin"]}"#).await;
    let token = answer.json["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no dev token: {}", answer.json))
        .to_owned();
    let addr = server.addr.to_string();

    // The script blocks a thread; the server keeps serving on the runtime's workers.
    let finished = tokio::task::spawn_blocking(move || run_script(&dir, &addr, &token))
        .await
        .expect("the script's runner");
    server.stop().await;

    finished.expect_success("client.mjs", SCRIPT_TIMEOUT);
}
