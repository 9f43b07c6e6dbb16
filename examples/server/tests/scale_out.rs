//! Two server processes behind nginx (`deploy/nginx/upcoach.conf.in`), sharing Redis and
//! Postgres, round robin, no sticky sessions:
//! - WebSocket and SSE clients spread over both processes all get every broadcast,
//!   once each, in order;
//! - an SSE client cut and reconnected lands on the other process and resumes there
//!   without loss;
//! - a sign-in on one process is refreshed and logged out on the other;
//! - the client's address reaches the processes from nginx, and a forged
//!   `X-Forwarded-For` from anyone else is ignored.
//!
//! Needs `nginx` (Debian: `apt-get install nginx-light`; skips without it unless
//! `UPCOACH_REQUIRE_NGINX=1`, set by `.ci/run`) and Redis and Postgres.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::SinkExt;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use upcoach_server::ServerConfig;

/// Set to `1` to turn a skip for a missing nginx into a failure.
const REQUIRE_NGINX: &str = "UPCOACH_REQUIRE_NGINX";
/// The address nginx connects to the processes from: their only trusted proxy.
const NGINX_FROM: &str = "127.0.0.2";
/// The address the test's "outside" client connects to nginx from.
const CLIENT_FROM: &str = "127.0.0.3";
const WAIT: Duration = Duration::from_secs(10);
const ROOM: &str = "public:scale";

/// A child process killed when dropped, its stderr kept for a failure's message.
struct Process {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Process {
    /// SIGTERM, then SIGKILL after 5 s: nginx's workers outlive a SIGKILLed master.
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// Starts `command` with stderr piped; with `ready`, waits for a line for which it gives
/// the address, else takes `addr`.
fn start(
    mut command: Command,
    addr: SocketAddr,
    ready: Option<fn(&str) -> Option<SocketAddr>>,
) -> Process {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the process starts");
    let stderr = child.stderr.take().expect("piped");
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = ready.and_then(|ready| ready(&line)) {
                let _ = tx.send(addr);
            }
            kept.lock().unwrap().push(line);
        }
    });
    let addr = match ready {
        None => addr,
        Some(_) => rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("not ready in 30 s: {:#?}", log.lock().unwrap())
            }),
    };
    Process { child, addr, log }
}

fn server(env: &[(&str, String)]) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_upcoach-server"));
    command
        .arg("--dev")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .env("UPCOACH_ADDR", "127.0.0.1:0")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    let unknown = SocketAddr::from(([0, 0, 0, 0], 0));
    start(
        command,
        unknown,
        Some(|line| {
            let rest = line.split("listening on http://").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        }),
    )
}

/// One HTTP/1.1 connection to `addr`, from `from` (the loopback address to bind).
async fn connect(
    addr: SocketAddr,
    from: &str,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    let stream = socket.connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// A request to `addr` from `from`; the status and the JSON body (`Null` when empty).
async fn call(
    addr: SocketAddr,
    from: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut sender = connect(addr, from).await;
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let response = sender
        .send_request(request.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn dev_token(addr: SocketAddr, roles: Value) -> Value {
    let (status, tokens) = call(
        addr,
        "127.0.0.1",
        Method::POST,
        "/dev/token",
        None,
        Some(json!({"roles": roles})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{tokens}");
    tokens
}

/// The open WebSocket and SSE connections of one process.
async fn connections(process: SocketAddr, admin: &str) -> (u64, u64) {
    let path = "/api/dashboard/realtime/status";
    let (status, body) = call(
        process,
        "127.0.0.1",
        Method::GET,
        path,
        Some(admin),
        None,
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let count = |kind: &str| body["connections"][kind].as_u64().unwrap();
    (count("ws"), count("sse"))
}

/// The open SSE connections of one process.
async fn sse_count(process: SocketAddr, admin: &str) -> u64 {
    connections(process, admin).await.1
}

/// An SSE stream being read.
struct Sse {
    body: Incoming,
    text: String,
}

/// One SSE record: its id, event name and data.
#[derive(Debug)]
struct Record {
    id: String,
    event: String,
    data: Value,
}

impl Sse {
    async fn open(addr: SocketAddr, rooms: &str, token: &str, last_event_id: Option<&str>) -> Sse {
        let mut sender = connect(addr, "127.0.0.1").await;
        let mut request = http::Request::get(format!("/api/dashboard/realtime/sse?rooms={rooms}"))
            .header("host", addr.to_string())
            .header("authorization", format!("Bearer {token}"));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        Sse {
            body: response.into_body(),
            text: String::new(),
        }
    }

    /// The next record with an event name (comments, `retry:` skipped), within 10 s.
    async fn next(&mut self) -> Record {
        loop {
            if let Some(end) = self.text.find("\n\n") {
                let raw: String = self.text.drain(..end + 2).collect();
                let field = |name: &str| {
                    raw.lines()
                        .find_map(|line| line.strip_prefix(name))
                        .map(str::to_owned)
                };
                if let (Some(event), Some(data)) = (field("event: "), field("data: ")) {
                    return Record {
                        id: field("id: ").unwrap_or_default(),
                        event,
                        data: serde_json::from_str(&data).unwrap(),
                    };
                }
                continue;
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("an SSE record in time")
                .expect("the stream is open")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.text.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }

    /// The seqs of the next `n` events of [`ROOM`].
    async fn seqs(&mut self, n: usize) -> (Vec<u64>, String) {
        let mut seqs = Vec::new();
        let mut last = String::new();
        while seqs.len() < n {
            let record = self.next().await;
            assert_eq!(record.data["room"], ROOM, "{record:?}");
            seqs.push(record.data["seq"].as_u64().unwrap());
            last = record.id;
        }
        (seqs, last)
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws(addr: SocketAddr, token: &str) -> Ws {
    let url = format!("ws://{addr}/api/dashboard/realtime/ws?access_token={token}");
    let mut ws = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket through nginx")
        .0;
    let subscribe = json!({"type": "subscribe", "room": ROOM}).to_string();
    ws.send(Message::text(subscribe)).await.unwrap();
    let reply = support::next_json(&mut ws).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    ws
}

/// The seqs of the next `n` events on a WebSocket.
async fn ws_seqs(ws: &mut Ws, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < n {
        let message = support::next_json(ws).await;
        if message["type"] == "event" {
            assert_eq!(message["room"], ROOM);
            seqs.push(message["seq"].as_u64().unwrap());
        }
    }
    seqs
}

async fn broadcast(addr: SocketAddr, admin: &str, n: u64) -> u64 {
    let path = format!("/api/dashboard/realtime/broadcast/{ROOM}");
    let (status, body) = call(
        addr,
        "127.0.0.1",
        Method::POST,
        &path,
        Some(admin),
        Some(json!({"event": "tick", "data": {"n": n}})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    body["seq"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_behind_nginx_share_rooms_sessions_and_resume_streams() {
    if nginx_present() {
        share_rooms_sessions_and_streams(support::Services::create().await).await;
    }
}

/// The same on a Redis Cluster: B lists the seeds from the second on, so the two
/// processes subscribe on different nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_two_processes_behind_nginx_share_rooms_sessions_and_streams() {
    if nginx_present() {
        share_rooms_sessions_and_streams(support::Services::create_on_cluster().await).await;
    }
}

/// Whether nginx is here; fails instead under `UPCOACH_REQUIRE_NGINX=1`.
fn nginx_present() -> bool {
    if upcoach_testing::Nginx::binary().is_none() {
        let required = std::env::var(REQUIRE_NGINX).is_ok_and(|v| v == "1");
        assert!(
            !required,
            "nginx is missing, but {REQUIRE_NGINX}=1: apt-get install nginx-light"
        );
        eprintln!("skipping: nginx is missing (apt-get install nginx-light)");
        return false;
    }
    true
}

async fn share_rooms_sessions_and_streams(services: Option<support::Services>) {
    let Some(services) = services else {
        return;
    };
    let mut config = ServerConfig::default();
    services.configure(&mut config);
    let url =
        |u: &Option<upcoach_core::config::ServiceUrl>| u.as_ref().unwrap().expose().to_owned();
    let env = [
        ("DATABASE_URL", url(&config.services.database_url)),
        ("REDIS_URL", url(&config.services.redis_url)),
        ("CACHE_PREFIX", config.cache.prefix.clone()),
        ("AUTH_SIGNING_KEY", support::SIGNING_KEY.to_owned()),
        ("TRUSTED_PROXIES", NGINX_FROM.to_owned()),
    ];
    let a = server(&env);
    let mut env_b = env.clone();
    if services.prefix.is_cluster() {
        env_b[1].1 = upcoach_testing::rotated_cluster_url(&env[1].1, 1);
    }
    let b = server(&env_b);
    let proxy = upcoach_testing::Nginx::start(&[a.addr, b.addr], NGINX_FROM, |config| config)
        .await
        .expect("nginx starts");
    let lb = proxy.addr();
    let diagnostics = || {
        let (a, b, nginx) = (a.log(), b.log(), proxy.error_log());
        format!("A:\n{a}\nB:\n{b}\nnginx:\n{nginx}")
    };
    let admin_tokens = dev_token(a.addr, json!(["admin"])).await;
    let admin = admin_tokens["access_token"].as_str().unwrap().to_owned();

    // 1. Clients through nginx land on both processes (round robin: one kind at a
    //    time, or each kind would land on one process).
    let mut sockets = Vec::new();
    for _ in 0..4 {
        sockets.push(ws(lb, &admin).await);
    }
    let mut streams = Vec::new();
    for _ in 0..4 {
        streams.push(Sse::open(lb, ROOM, &admin, None).await);
    }
    for process in [a.addr, b.addr] {
        let (ws, sse) = connections(process, &admin).await;
        assert!(
            ws >= 1 && sse >= 1,
            "{process}: {ws} WebSockets, {sse} SSE\n{}",
            diagnostics()
        );
    }

    // 2. Every broadcast, published through nginx (so on both processes), reaches every
    //    client once, in order.
    let mut published = Vec::new();
    for n in 1..=6 {
        published.push(broadcast(lb, &admin, n).await);
    }
    assert_eq!(published, (1..=6).collect::<Vec<u64>>());
    for socket in &mut sockets {
        assert_eq!(ws_seqs(socket, 6).await, published);
    }
    for stream in &mut streams {
        assert_eq!(stream.seqs(6).await.0, published);
    }

    // 3. An SSE client cut and reconnected lands on the other process and resumes.
    let (a0, b0) = (
        sse_count(a.addr, &admin).await,
        sse_count(b.addr, &admin).await,
    );
    let mut moving = Sse::open(lb, ROOM, &admin, None).await;
    let (a1, b1) = (
        sse_count(a.addr, &admin).await,
        sse_count(b.addr, &admin).await,
    );
    let other = match (a1 - a0, b1 - b0) {
        (1, 0) => b.addr,
        (0, 1) => a.addr,
        counts => panic!("the new stream is on neither or both: {counts:?}"),
    };
    assert_eq!(broadcast(lb, &admin, 7).await, 7);
    let (seqs, cursor) = moving.seqs(1).await;
    assert_eq!(seqs, [7]);
    drop(moving);
    for n in 8..=9 {
        broadcast(lb, &admin, n).await;
    }
    let mut landed = None;
    for _ in 0..4 {
        let before = sse_count(other, &admin).await;
        let stream = Sse::open(lb, ROOM, &admin, Some(&cursor)).await;
        if sse_count(other, &admin).await > before {
            landed = Some(stream);
            break;
        }
    }
    let mut moved = landed.unwrap_or_else(|| panic!("never landed on {other}\n{}", diagnostics()));
    assert_eq!(
        moved.seqs(2).await.0,
        [8, 9],
        "the missed events, once, in order"
    );
    assert_eq!(broadcast(lb, &admin, 10).await, 10);
    assert_eq!(moved.seqs(1).await.0, [10], "then live ones");

    // 4. Signed in on A, refreshed and logged out on B; A then refuses the token.
    let mut security = Sse::open(a.addr, "security", &admin, None).await;
    let user = dev_token(a.addr, json!([])).await;
    let refresh = |addr, token: &Value, from, headers: &'static [(&str, &str)]| {
        let body = json!({"refresh_token": token});
        async move {
            call(
                addr,
                from,
                Method::POST,
                "/auth/refresh",
                None,
                Some(body),
                headers,
            )
            .await
        }
    };
    let (status, rotated) = refresh(
        b.addr,
        &user["refresh_token"],
        "127.0.0.1",
        &[("x-forwarded-for", "198.51.100.7")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let (status, body) = call(
        b.addr,
        "127.0.0.1",
        Method::POST,
        "/auth/logout",
        rotated["access_token"].as_str(),
        Some(json!({"refresh_token": rotated["refresh_token"]})),
        &[],
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = refresh(a.addr, &rotated["refresh_token"], "127.0.0.1", &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(
        body["error"]["code"], "refresh_token_revoked",
        "B's logout, seen by A"
    );

    // 5. The client's address: through nginx it is the client's own; sent directly, a
    //    forged X-Forwarded-For is ignored (the peer is not nginx).
    let outside = dev_token(a.addr, json!([])).await;
    let (status, body) = refresh(
        lb,
        &outside["refresh_token"],
        CLIENT_FROM,
        &[("x-forwarded-for", "198.51.100.7")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let wanted = [
        (user["user"]["id"].clone(), "127.0.0.1"),
        (outside["user"]["id"].clone(), CLIENT_FROM),
    ];
    let mut found = Vec::new();
    while found.len() < wanted.len() {
        let record = security.next().await;
        let event = &record.data["data"];
        if record.event == "security_event" && event["event_type"] == "session_refreshed" {
            found.push((
                event["user_id"].clone(),
                event["ip_address"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    for (user, address) in wanted {
        let seen = found
            .iter()
            .find(|(u, _)| *u == user)
            .map(|(_, ip)| ip.as_str());
        assert_eq!(seen, Some(address), "{user}: {found:?}");
    }
    drop((a, b, proxy));
}
