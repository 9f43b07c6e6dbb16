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

    /// The variables that make this provider upcoach's Google, with client id
    /// `client_id` and secret `client_secret`.
    pub fn google_env(&self, client_id: &str, client_secret: &str) -> Vec<(&'static str, String)> {
        vec![
            ("GOOGLE_CLIENT_ID", client_id.to_owned()),
            ("GOOGLE_CLIENT_SECRET", client_secret.to_owned()),
            ("GOOGLE_ISSUER_URL", self.issuer.clone()),
        ]
    }
}

impl OidcProvider {
    /// An id token this provider issues to `client_id` for `claims` with `nonce`, as a
    /// native app's SDK obtains one: the authorization request (the claims as its
    /// `login_hint`, see `provider.mjs`), then the code exchange.
    ///
    /// # Panics
    ///
    /// When the provider does not answer as it should (a failed test).
    pub async fn id_token(
        &self,
        client_id: &str,
        nonce: &str,
        claims: &serde_json::Value,
    ) -> String {
        use base64::Engine;
        const REDIRECT_URI: &str = "http://app.example.test/native";
        let hint = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
        let mut authorize =
            url::Url::parse(&format!("{}/authorize", self.base())).expect("the issuer is a URL");
        authorize
            .query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", REDIRECT_URI)
            .append_pair("scope", "openid email")
            .append_pair("nonce", nonce)
            .append_pair("login_hint", &hint);
        let answer =
            crate::client::send(http::Method::GET, authorize.as_str(), &[], Vec::new()).await;
        let (status, headers) = (answer.status, answer.headers);
        assert_eq!(status, 302, "the authorization request is redirected");
        let location = headers
            .get("location")
            .and_then(|l| l.to_str().ok())
            .and_then(|l| url::Url::parse(l).ok())
            .expect("a Location URL");
        let code = location
            .query_pairs()
            .find(|(k, _)| k == "code")
            .map(|(_, v)| v.into_owned())
            .expect("a code");
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", &code)
            .append_pair("redirect_uri", REDIRECT_URI)
            .append_pair("client_id", client_id)
            .finish();
        let token_url =
            url::Url::parse(&format!("{}/token", self.base())).expect("the issuer is a URL");
        let answer = crate::client::send(
            http::Method::POST,
            token_url.as_str(),
            &[("content-type", "application/x-www-form-urlencoded")],
            form.into_bytes(),
        )
        .await;
        let (status, body) = (answer.status, answer.body);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let answer: serde_json::Value = serde_json::from_slice(&body).expect("a JSON answer");
        answer["id_token"].as_str().expect("an id token").to_owned()
    }

    /// The issuer without a trailing `/`, where the endpoints are.
    fn base(&self) -> &str {
        self.issuer.trim_end_matches('/')
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
