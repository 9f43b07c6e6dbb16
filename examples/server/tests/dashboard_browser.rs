//! `GET /dashboard` in a real browser: `tests/js/dashboard/dashboard.mjs` drives Debian's
//! headless Chromium (through the npm `playwright-core`) against the reference server
//! binary in `--dev` mode. It signs in, watches the figures follow its requests, sees a
//! broadcast alert and a security event appear, cuts the page's connection and checks
//! that the page resumed with every event once, and, with Redis and Postgres, restarts
//! the server and checks the same on the new process. Screenshots at desktop and phone
//! widths land in `target/tmp/dashboard-screenshots/`.
//!
//! Skips with a printed reason when `node`, the script's `node_modules` (`npm ci` in
//! `tests/js/dashboard`) or Chromium (`apt-get install chromium`, or `CHROMIUM=<path>`)
//! is missing, unless `UPCOACH_REQUIRE_NODE=1` / `UPCOACH_REQUIRE_BROWSER=1` (set by
//! `.ci/run`) turn the skip into a failure.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use upcoach_server::ServerConfig;

/// Set to `1` to turn a skip for a missing `node` or `node_modules` into a failure.
const REQUIRE_NODE: &str = "UPCOACH_REQUIRE_NODE";
/// Set to `1` to turn a skip for a missing Chromium into a failure.
const REQUIRE_BROWSER: &str = "UPCOACH_REQUIRE_BROWSER";
/// How long the script may run (it gives up on its own after 150 s).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(200);

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// `None` when the script can run; otherwise why not, and which variable requires it.
fn missing_prerequisite(dir: &Path) -> Option<(String, &'static str)> {
    if let Some(reason) = support::node_missing(dir) {
        return Some((reason, REQUIRE_NODE));
    }
    let browser = chromium();
    if !browser.is_file() {
        let reason = format!(
            "{} is missing; `apt-get install chromium`, or set CHROMIUM",
            browser.display()
        );
        return Some((reason, REQUIRE_BROWSER));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_shows_live_figures_and_resumes_without_loss() {
    let dir = support::js_dir("dashboard");
    if let Some((reason, variable)) = missing_prerequisite(&dir) {
        let required = std::env::var(variable).is_ok_and(|v| v == "1");
        assert!(
            !required,
            "{reason}, but {variable}=1: this run must not skip the browser test"
        );
        eprintln!("skipping: {reason}");
        return;
    }
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");

    let mut command = Command::new("node");
    command
        .arg("dashboard.mjs")
        .arg(env!("CARGO_BIN_EXE_upcoach-server"))
        .arg(&artifacts)
        .current_dir(&dir)
        .env_remove("REDIS_URL")
        .env_remove("DATABASE_URL");
    // With the services, the server keeps its users, refresh tokens and the rooms'
    // history in a schema and under a key prefix of this test's own, so a second process
    // resumes where the first stopped.
    // Google is an independent OpenID provider (npm `oauth2-mock-server`), as in
    // google_signin.rs.
    let Some(google) = upcoach_testing::OidcProvider::start().await else {
        return;
    };
    command.envs(support::signin::google_env(&google));
    let services = support::Services::create().await;
    if let Some(services) = &services {
        let mut config = ServerConfig::default();
        services.configure(&mut config);
        let url = |u: &Option<upcoach_core::config::ServiceUrl>| {
            u.as_ref().expect("configured").expose().to_owned()
        };
        command
            .env("DATABASE_URL", url(&config.services.database_url))
            .env("REDIS_URL", url(&config.services.redis_url))
            .env("CACHE_PREFIX", &config.cache.prefix);
    }

    let finished =
        tokio::task::spawn_blocking(move || support::run_script(command, SCRIPT_TIMEOUT))
            .await
            .expect("the script's runner");
    finished.expect_success("dashboard.mjs", SCRIPT_TIMEOUT);
    for shot in ["dashboard-desktop.png", "dashboard-phone.png"] {
        let size = std::fs::metadata(artifacts.join(shot)).map_or(0, |m| m.len());
        assert!(size > 10_000, "{shot} was saved ({size} bytes)");
    }
    assert!(
        finished.stdout.contains("provider sign-in: Signed in as"),
        "the provider step ran\n{}",
        finished.output()
    );
    assert!(
        services.is_none() || finished.stdout.contains("resumed on a new process"),
        "with the services the restart step ran\n{}",
        finished.output()
    );
}
