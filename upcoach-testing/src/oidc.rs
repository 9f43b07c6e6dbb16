//! An independent OpenID provider for sign-in tests: the npm package `oauth2-mock-server`
//! run by `tests/js/oidc/provider.mjs` (packages installed with `npm ci` there).

use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running provider; stopped when dropped.
#[derive(Debug)]
pub struct OidcProvider {
    issuer: String,
    child: Child,
}

fn script_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/js/oidc")
}

fn required() -> bool {
    std::env::var("UPCOACH_REQUIRE_NODE").is_ok_and(|v| v == "1")
}

impl OidcProvider {
    /// Starts the provider on a free port. `None` (with a printed reason) when Node or
    /// the packages are missing, unless `UPCOACH_REQUIRE_NODE=1`, which makes that a
    /// failure.
    pub async fn start() -> Option<Self> {
        Self::spawn(&[]).await
    }

    /// Like [`start`](Self::start), with an issuer that ends in `/`
    /// (`http://127.0.0.1:<port>/`), as discovery, the tokens and RFC 9207's `iss` then
    /// name it.
    pub async fn start_with_trailing_slash() -> Option<Self> {
        Self::spawn(&["trailing-slash"]).await
    }

    async fn spawn(options: &[&str]) -> Option<Self> {
        let dir = script_dir();
        if !dir.join("node_modules/oauth2-mock-server").exists() {
            let why = "tests/js/oidc/node_modules is missing (run `npm ci` in tests/js/oidc)";
            assert!(!required(), "UPCOACH_REQUIRE_NODE=1 but {why}");
            eprintln!("skipped: {why}");
            return None;
        }
        let spawned = Command::new("node")
            .arg("provider.mjs")
            .arg("0")
            .args(options)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                assert!(
                    !required(),
                    "UPCOACH_REQUIRE_NODE=1 but node could not start: {e}"
                );
                eprintln!("skipped: node could not start: {e}");
                return None;
            }
        };
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line())
            .await
            .expect("the provider announces itself within 20 s")
            .expect("the provider's output is readable")
            .expect("the provider printed its issuer");
        let parsed: serde_json::Value = serde_json::from_str(&line).expect("one JSON line");
        let issuer = parsed["issuer"].as_str().expect("an issuer").to_owned();
        Some(Self { issuer, child })
    }

    /// The issuer URL (`http://127.0.0.1:<port>`, with a trailing `/` when started so),
    /// where discovery starts.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
