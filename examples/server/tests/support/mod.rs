//! A minimal HTTP/1.1 client and a server started on a free port (from a configuration
//! or an environment list); sign-in flows in [`signin`].
// Each test binary uses a different part of this module.
#![allow(dead_code)]

pub(crate) mod signin;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use upcoach_core::config::{ServiceUrl, Settings};
use upcoach_server::{App, Options, ServerConfig};
use upcoach_testing::{PgSchema, RedisPrefix};

/// The web app's page a browser sign-in returns to: the one `return_to` that
/// [`Running::from_env`] allows unless told otherwise.
pub(crate) const RETURN_TO: &str = "http://app.example.test/signed-in";
/// `AUTH_SIGNING_KEY` of [`Running::from_env`] unless told otherwise: the Ed25519 seed
/// `[7; 32]`, base64url.
pub(crate) const SIGNING_KEY: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc";

pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    /// The body, parsed: `Null` when it is empty or not JSON.
    pub(crate) json: Value,
    /// The body as it came.
    pub(crate) body: Bytes,
}

impl Answer {
    fn new(status: StatusCode, headers: HeaderMap, body: Bytes) -> Self {
        Self {
            status,
            headers,
            json: serde_json::from_slice(&body).unwrap_or(Value::Null),
            body,
        }
    }

    /// The `Location` it redirects to.
    pub(crate) fn location(&self) -> url::Url {
        let location = self.headers["location"].to_str().expect("a text Location");
        url::Url::parse(location).unwrap_or_else(|e| panic!("Location {location:?}: {e}"))
    }

    /// The error's `code` (empty when the answer is no error).
    pub(crate) fn code(&self) -> String {
        self.json["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// Sends one request on a new connection.
pub(crate) async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> Answer {
    request_with(addr, method, path, body, None).await
}

/// The body of `GET path` as text.
pub(crate) async fn get_text(addr: SocketAddr, path: &str) -> String {
    let (_, _, bytes) = raw(addr, Method::GET, path, None, None).await;
    String::from_utf8(bytes.to_vec()).expect("UTF-8 body")
}

/// Sends one request, with a bearer token if given.
pub(crate) async fn request_with(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> Answer {
    let (status, headers, bytes) = raw(addr, method, path, body, token).await;
    if !bytes.is_empty()
        && let Err(e) = serde_json::from_slice::<Value>(&bytes)
    {
        panic!("not JSON ({e}): {bytes:?}");
    }
    Answer::new(status, headers, bytes)
}

/// A POST with `content_type` and no bearer; the answer's status and JSON.
pub(crate) async fn request_typed(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    body: &str,
) -> Answer {
    request_to_host(addr, &addr.to_string(), path, content_type, body).await
}

/// A POST to `addr` that says it is for `host`.
pub(crate) async fn request_to_host(
    addr: SocketAddr,
    host: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> Answer {
    let request = Request::post(path)
        .header("host", host)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let (status, headers, bytes) = round_trip(addr, request).await;
    Answer::new(status, headers, bytes)
}

/// Sends one request with `headers` (a JSON body if given); the answer's status,
/// headers and JSON (`Null` when the body is empty or not JSON).
pub(crate) async fn request_headers(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    let (status, headers, bytes) = round_trip(addr, build(addr, method, path, body, headers)).await;
    Answer::new(status, headers, bytes)
}

/// A request to `addr` with `headers` and, if given, a JSON body.
fn build(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from(body.unwrap_or("").to_owned())))
        .unwrap()
}

/// `GET path` with a bearer token: status, headers and raw body.
pub(crate) async fn raw_with(
    addr: SocketAddr,
    path: &str,
    token: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    raw(addr, Method::GET, path, None, Some(token)).await
}

/// One request, with a bearer token if given: status, headers and raw body.
pub(crate) async fn raw(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (StatusCode, HeaderMap, Bytes) {
    let bearer = token.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    round_trip(addr, build(addr, method, path, body, &headers)).await
}

/// One HTTP/1.1 request to `url` (any host and port: the server or a provider), no
/// redirects followed; a body is JSON unless `headers` name another content type.
pub(crate) async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Answer {
    let url = url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    let addr = url.socket_addrs(|| None).expect("a reachable address")[0];
    let target = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let mut request = Request::builder()
        .method(method)
        .uri(target)
        .header("host", url.authority());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let typed = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
    if body.is_some() && !typed {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let (status, headers, bytes) = round_trip(addr, request).await;
    Answer::new(status, headers, bytes)
}

/// `GET path` on a connection of its own, answered with the body still streaming (an
/// SSE stream): the caller reads it frame by frame.
pub(crate) async fn open_stream(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut request = Request::get(path).header("host", "localhost");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    sender.send_request(request).await.expect("response")
}

/// Sends `request` on a new connection to `addr`: status, headers and raw body.
async fn round_trip(
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
) -> (StatusCode, HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let response = sender.send_request(request).await.expect("response");
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, headers, bytes)
}

pub(crate) struct Running {
    pub(crate) addr: SocketAddr,
    pub(crate) app: Arc<App>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    pub(crate) async fn start(config: ServerConfig, options: Options) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, config, options).await
    }

    /// The server configured from `env` alone (the process environment is not read),
    /// listening on a free loopback port; `edit` changes the configuration read.
    ///
    /// Unless `env` names them: `UPCOACH_ADDR` is that port, `UPCOACH_PUBLIC_URL`
    /// `http://` it (so a provider's redirect to our callback reaches this server),
    /// `AUTH_RETURN_TO_ALLOWLIST` [`RETURN_TO`] and `AUTH_SIGNING_KEY` [`SIGNING_KEY`].
    pub(crate) async fn from_env(
        env: &[(&str, String)],
        edit: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let defaults = [
            ("UPCOACH_ADDR", addr.to_string()),
            ("UPCOACH_PUBLIC_URL", format!("http://{addr}")),
            ("AUTH_RETURN_TO_ALLOWLIST", RETURN_TO.to_owned()),
            ("AUTH_SIGNING_KEY", SIGNING_KEY.to_owned()),
        ];
        let mut config = ServerConfig::from_lookup(|name| {
            env.iter()
                .chain(&defaults)
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|e| panic!("the environment list reads: {e:?}"));
        edit(&mut config);
        Self::start_on(listener, config, Options::default()).await
    }

    async fn start_on(
        listener: tokio::net::TcpListener,
        config: ServerConfig,
        options: Options,
    ) -> Self {
        let app = App::start(config, options).await.expect("app starts");
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(upcoach_server::serve(
            listener,
            app.service(),
            async {
                let _ = stopped.await;
            },
            app.serve_options(),
        ));
        Self {
            addr,
            app,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Answer {
        request(self.addr, Method::GET, path, None).await
    }

    pub(crate) async fn post(&self, path: &str, body: &str) -> Answer {
        request(self.addr, Method::POST, path, Some(body)).await
    }

    /// `path` on this server, as a URL.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `method path`, with a JSON `body` and a bearer `token` if given.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> Answer {
        let body = body.map(|b| b.to_string());
        self.send_text(method, path, body, token).await
    }

    /// `method path`, with a `body` sent as it is (JSON or not) and a bearer `token`
    /// if given.
    pub(crate) async fn send_text(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
        token: Option<&str>,
    ) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("authorization", b.as_str()))
            .collect();
        send(method, &self.url(path), &headers, body).await
    }

    /// `GET path`, with a bearer `token` if given.
    pub(crate) async fn get_as(&self, path: &str, token: Option<&str>) -> Answer {
        self.send(Method::GET, path, None, token).await
    }

    /// `POST /auth/refresh` `{"refresh_token"}` with `headers` (and nothing else).
    pub(crate) async fn refresh(&self, refresh_token: &Value, headers: &[(&str, &str)]) -> Answer {
        send(
            Method::POST,
            &self.url("/auth/refresh"),
            headers,
            Some(json!({ "refresh_token": refresh_token }).to_string()),
        )
        .await
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// A Postgres schema and a Redis key prefix of one test's own, for a server that keeps
/// its users in Postgres and its flows in Redis.
pub(crate) struct Services {
    pub(crate) schema: PgSchema,
    pub(crate) prefix: RedisPrefix,
}

impl Services {
    /// Both, or `None` (skip, with the reason printed) when `DATABASE_URL` or
    /// `REDIS_URL` is unset.
    pub(crate) async fn create() -> Option<Self> {
        let schema = PgSchema::create().await?;
        let prefix = RedisPrefix::create()?;
        Some(Self { schema, prefix })
    }

    /// The same with the Redis Cluster of `REDIS_CLUSTER_URL`; `None` (skip) when a
    /// variable is unset.
    pub(crate) async fn create_on_cluster() -> Option<Self> {
        let schema = PgSchema::create().await?;
        let prefix = RedisPrefix::on_cluster()?;
        Some(Self { schema, prefix })
    }

    /// Points `config` at them: Postgres with the schema as its search path, Redis and
    /// the cache under the prefix.
    pub(crate) fn configure(&self, config: &mut ServerConfig) {
        let mut database = url::Url::parse(self.schema.url()).unwrap();
        database
            .query_pairs_mut()
            .append_pair("options", &format!("-c search_path={}", self.schema.name()));
        config.cache.prefix = self.prefix.prefix().trim_end_matches(':').to_owned();
        config.services.database_url =
            Some(ServiceUrl::parse(database.as_str(), &["postgres"]).unwrap());
        config.services.redis_url =
            Some(ServiceUrl::parse(self.prefix.url(), &["redis", "redis+cluster"]).unwrap());
    }
}

/// A WebSocket client of the server.
pub(crate) type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket to the server's realtime route, signed in with `token`.
pub(crate) async fn ws(server: &Running, token: &str) -> Ws {
    let url = format!(
        "ws://{}/api/dashboard/realtime/ws?access_token={token}",
        server.addr
    );
    tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket handshake")
        .0
}

/// The next JSON text frame (pings and pongs skipped), within 10 s.
pub(crate) async fn next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok")
        {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// How a script run by [`run_script`] ended.
pub(crate) struct Finished {
    /// `None` when the script was killed for taking too long.
    pub(crate) code: Option<i32>,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Finished {
    /// Its output, for a test's message.
    pub(crate) fn output(&self) -> String {
        format!("--- stdout\n{}--- stderr\n{}", self.stdout, self.stderr)
    }

    /// Panics unless the script exited 0; prints its output.
    pub(crate) fn expect_success(&self, name: &str, timeout: std::time::Duration) {
        match self.code {
            Some(0) => println!("{}", self.output()),
            Some(code) => panic!("{name} exited with {code}\n{}", self.output()),
            None => panic!(
                "{name} took longer than {timeout:?} and was killed\n{}",
                self.output()
            ),
        }
    }
}

/// Runs `command` (a blocking call: use `spawn_blocking`), killing it after `timeout`.
pub(crate) fn run_script(
    mut command: std::process::Command,
    timeout: std::time::Duration,
) -> Finished {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the script starts");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout piped")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr piped")));
    let started = std::time::Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait for the script") {
            break Some(status.code().unwrap_or(-1));
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    Finished {
        code,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// `tests/js/<name>` at the workspace root: a Node script's folder.
pub(crate) fn js_dir(name: &str) -> std::path::PathBuf {
    // CARGO_MANIFEST_DIR is examples/server, two levels below the workspace root.
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("examples/server sits two levels below the workspace root");
    workspace.join("tests/js").join(name)
}

/// `None` when `node` runs and `dir` has its `node_modules`; otherwise why not.
pub(crate) fn node_missing(dir: &std::path::Path) -> Option<String> {
    match std::process::Command::new("node").arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => return Some(format!("`node --version` failed: {}", out.status)),
        Err(e) => {
            return Some(format!(
                "`node` cannot be run ({e}); install Node 20 or later"
            ));
        }
    }
    let modules = dir.join("node_modules");
    if !modules.is_dir() {
        return Some(format!(
            "{} is missing; run `npm ci` in {}",
            modules.display(),
            dir.display()
        ));
    }
    None
}
