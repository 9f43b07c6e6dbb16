//! The fault suite: what each outage of Postgres or Redis does to the whole server.
//!
//! Each test states which requests fail and with which code, that none waits past its
//! timeout, that the server recovers by itself, and what survives the outage: audit
//! events, refresh families, realtime streams, rate limits. The README's "Outages"
//! table sums them up.
//!
//! Postgres goes down through a [`FaultProxy`] (the shared server is never stopped) and
//! by `pg_terminate_backend` on the server's own connections; Redis is a
//! [`PrivateRedis`] of the test's own, killed and restarted empty, frozen with
//! `DEBUG SLEEP` or rid of its clients with `CLIENT KILL`.

mod support;

use std::future::Future;
use std::time::Duration;

use futures_util::SinkExt;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use support::signin::{Browser, google_env};
use support::{Answer, Running, next_json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use upcoach_core::config::ServiceUrl;
use upcoach_server::{Options, ServerConfig};
use upcoach_testing::{FaultProxy, PgSchema, PrivateRedis, RedisPrefix};

/// The longest a request may take while Postgres is down: the pool's acquire timeout
/// (5 s) and a margin for two shared cores.
const POSTGRES_BOUND: Duration = Duration::from_secs(7);
/// The longest a request may take while Redis is down or frozen: a connect or response
/// timeout (2 s each) and a margin.
const REDIS_BOUND: Duration = Duration::from_secs(5);
/// How long the server may take to be healthy again after a service comes back.
const RECOVERY: Duration = Duration::from_secs(20);

/// Panics anywhere in this test binary so far (the server's tasks included, whose
/// panics Tokio would otherwise only log).
static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts every panic from now on in [`PANICS`] (once per binary).
fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// Fails if anything panicked: a server task through the outage, or another test.
fn assert_no_panics() {
    assert_eq!(
        PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "something panicked (see the output above)"
    );
}

fn dev() -> Options {
    Options {
        dev: true,
        ..Options::default()
    }
}

/// A Postgres URL for `schema` reached at `addr`, its connections named `application`.
fn database_url(schema: &PgSchema, addr: std::net::SocketAddr, application: &str) -> ServiceUrl {
    ServiceUrl::parse(&database_url_text(schema, addr, application), &["postgres"]).unwrap()
}

/// [`database_url`] as text, for an environment list.
fn database_url_text(schema: &PgSchema, addr: std::net::SocketAddr, application: &str) -> String {
    let mut url = url::Url::parse(&upcoach_testing::url_via(schema.url(), addr)).unwrap();
    url.query_pairs_mut()
        .append_pair("options", &format!("-c search_path={}", schema.name()))
        .append_pair("application_name", application);
    url.into()
}

/// The server on `database` and `redis`, its keys under `prefix`. Rate limits stay on
/// (their outage policy is part of what is tested) except where `limits` is false.
async fn start(database: ServiceUrl, redis: &str, prefix: &str, limits: bool) -> Running {
    count_panics();
    let mut config = ServerConfig::default();
    config.services.database_url = Some(database);
    config.services.redis_url = Some(ServiceUrl::parse(redis, &["redis"]).unwrap());
    config.cache.prefix = prefix.trim_end_matches(':').to_owned();
    config.limits.enabled = limits;
    Running::start(config, dev()).await
}

/// `request`, and how long it took.
async fn timed(request: impl Future<Output = Answer>) -> (Answer, Duration) {
    let started = Instant::now();
    let answer = request.await;
    (answer, started.elapsed())
}

/// A TokenResponse for a new user with `roles`.
async fn dev_token(server: &Running, roles: &[&str]) -> Value {
    let answer = server
        .post("/dev/token", &json!({ "roles": roles }).to_string())
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    answer.json
}

/// Polls `/health` until it answers 200 `ok`; fails after [`RECOVERY`].
async fn until_healthy(server: &Running) {
    let deadline = Instant::now() + RECOVERY;
    loop {
        let answer = server.get("/health").await;
        if answer.status == StatusCode::OK && answer.json["status"] == "ok" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not healthy again within {RECOVERY:?}: {}",
            answer.json
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `/health` until `check` reports `down`; the answer.
async fn until_down(server: &Running, check: &str) -> Answer {
    let deadline = Instant::now() + RECOVERY;
    loop {
        let answer = server.get("/health").await;
        if answer.json["checks"][check]["status"] == "down" {
            return answer;
        }
        assert!(
            Instant::now() < deadline,
            "{check} never reported down: {}",
            answer.json
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /auth/refresh` with `token` until it is not a 503 (at most [`RECOVERY`]).
async fn refresh_when_back(server: &Running, token: &Value) -> Answer {
    let deadline = Instant::now() + RECOVERY;
    loop {
        let answer = server.refresh(token, &[]).await;
        if answer.status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A WebSocket opened and closed by its client: two audit events (`connect`,
/// `disconnect`).
async fn open_and_close_websocket(server: &Running, token: &str) {
    let mut ws = support::ws(server, token).await;
    ws.send(Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "pong");
    ws.close(None).await.unwrap();
    // Read to the end, so the server has seen the close before the next step.
    while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws).await {}
}

/// Audit rows of `table` for `user`, polled until there are `want` (or [`RECOVERY`]
/// passes): the count.
async fn audit_rows(schema: &PgSchema, table: &str, user: &str, want: i64) -> i64 {
    let deadline = Instant::now() + RECOVERY;
    let query = format!("SELECT count(*) FROM {table} WHERE user_id = $1::uuid");
    loop {
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(query.clone()))
            .bind(user)
            .fetch_one(schema.pool())
            .await
            .unwrap();
        if rows >= want || Instant::now() > deadline {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next event or reset a WebSocket reads, skipping `pong`s.
async fn next_delivery(ws: &mut support::Ws) -> Value {
    loop {
        let message = next_json(ws).await;
        if message["type"] != "pong" {
            return message;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_for_ten_seconds() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let proxy = FaultProxy::start(upcoach_testing::service_addr(schema.url())).await;
    let database = database_url(&schema, proxy.addr(), "upcoach-outage-pg-stop");
    let server = start(database, prefix.url(), prefix.prefix(), true).await;

    let admin = dev_token(&server, &["admin"]).await;
    let access = admin["access_token"].as_str().unwrap().to_owned();
    let user = admin["user"]["id"].as_str().unwrap().to_owned();
    let analytics = "/api/analytics/security-events?window=1h";
    let primed = server.get_as(analytics, Some(&access)).await;
    assert_eq!(primed.status, StatusCode::OK, "{}", primed.json);

    proxy.cut();
    let stopped = Instant::now();
    let health = until_down(&server, "postgres").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.json["checks"]["redis"]["status"], "ok");

    // What needs Postgres fails with 503 and a code naming the store, in time.
    let (refresh, took) = timed(server.refresh(&admin["refresh_token"], &[])).await;
    assert_eq!(
        refresh.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refresh.json
    );
    assert_eq!(refresh.code(), "refresh_store_unavailable");
    assert!(took < POSTGRES_BOUND, "refresh took {took:?}");
    let (token, took) = timed(server.post("/dev/token", r#"{"roles":[]}"#)).await;
    assert_eq!(
        token.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        token.json
    );
    assert_eq!(token.code(), "user_store_unavailable");
    assert!(took < POSTGRES_BOUND, "dev token took {took:?}");
    let (me, took) = timed(server.get_as("/auth/me", Some(&access))).await;
    assert_eq!(me.status, StatusCode::SERVICE_UNAVAILABLE, "{}", me.json);
    assert_eq!(me.code(), "user_store_unavailable");
    assert!(took < POSTGRES_BOUND, "me took {took:?}");

    // What does not: access tokens verify without Postgres, the cached analytics answer
    // stays served, realtime runs on Redis alone.
    let (cached, took) = timed(server.get_as(analytics, Some(&access))).await;
    assert_eq!(cached.status, StatusCode::OK, "{}", cached.json);
    assert_eq!(cached.headers["x-cache"], "HIT");
    assert_eq!(cached.body, primed.body);
    assert!(took < POSTGRES_BOUND);
    let broadcast = server
        .send(
            Method::POST,
            "/api/dashboard/realtime/broadcast/public:outage",
            Some(json!({"event": "note", "data": {"during": true}})),
            Some(&access),
        )
        .await;
    assert_eq!(broadcast.status, StatusCode::ACCEPTED, "{}", broadcast.json);
    // Three WebSockets come and go: six audit events, queued while Postgres is away.
    for _ in 0..3 {
        open_and_close_websocket(&server, &access).await;
    }

    let left = Duration::from_secs(10).saturating_sub(stopped.elapsed());
    tokio::time::sleep(left).await;
    proxy.restore();
    until_healthy(&server).await;

    // Every audit event of the outage reaches Postgres.
    assert_eq!(audit_rows(&schema, "websocket_events", &user, 6).await, 6);
    // The refresh that failed left the family as it was: the same token rotates once.
    let rotated = refresh_when_back(&server, &admin["refresh_token"]).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.json);
    let again = server.refresh(&rotated.json["refresh_token"], &[]).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.json);
    let me = server.get_as("/auth/me", Some(&access)).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.json);
    assert_no_panics();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backends_terminated_mid_rotation_leave_no_family_half_rotated() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let application = format!("upcoach-{}", schema.name());
    let direct = upcoach_testing::service_addr(schema.url());
    let database = database_url(&schema, direct, &application);
    // Rate limits off: eight clients rotating as fast as they can is the point here.
    let server = std::sync::Arc::new(start(database, prefix.url(), prefix.prefix(), false).await);

    const CLIENTS: usize = 8;
    const ROTATIONS: usize = 25;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let start = dev_token(&server, &[]).await;
        let server = server.clone();
        clients.push(tokio::spawn(async move {
            let mut token = start["refresh_token"].clone();
            let mut unavailable = 0u32;
            let mut done = 0;
            while done < ROTATIONS {
                let (answer, took) = timed(server.refresh(&token, &[])).await;
                assert!(took < POSTGRES_BOUND, "a refresh took {took:?}");
                match answer.status {
                    StatusCode::OK => {
                        token = answer.json["refresh_token"].clone();
                        done += 1;
                    }
                    // Retried with the same token: a failed rotation changed nothing.
                    // (A rotation reads the family, then the user: either store may
                    // be the one that lost its connection.)
                    StatusCode::SERVICE_UNAVAILABLE => {
                        assert!(
                            ["refresh_store_unavailable", "user_store_unavailable"]
                                .contains(&answer.code().as_str()),
                            "{}",
                            answer.json
                        );
                        unavailable += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("rotation {done}: {other} {}", answer.json),
                }
            }
            unavailable
        }));
    }

    // Every connection of the server to Postgres is ended, three times, while the
    // clients rotate.
    let mut terminated = 0i64;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let ended: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1) t",
        )
        .bind(&application)
        .fetch_one(schema.pool())
        .await
        .unwrap();
        terminated += ended;
    }
    assert!(terminated > 0, "the server had connections to end");
    let mut unavailable = 0;
    for client in clients {
        unavailable += client.await.expect("a client finished its rotations");
    }
    eprintln!("{terminated} backends ended; {unavailable} refreshes answered 503 and were retried");
    until_healthy(&server).await;
    let families: i64 =
        sqlx::query_scalar("SELECT count(*) FROM refresh_families WHERE revoked_at IS NOT NULL")
            .fetch_one(schema.pool())
            .await
            .unwrap();
    assert_eq!(families, 0, "no family was revoked as reused");
    assert_no_panics();
    std::sync::Arc::into_inner(server).unwrap().stop().await;
}

/// The room the realtime checks use.
const ROOM: &str = "public:outage";

/// The server on a Redis of the test's own (and the shared Postgres), with an admin
/// signed in.
struct OnPrivateRedis {
    server: Running,
    redis: PrivateRedis,
    admin: Value,
    access: String,
    _schema: PgSchema,
}

impl OnPrivateRedis {
    /// `None` (skip) without `DATABASE_URL` or `redis-server`.
    async fn start(name: &str) -> Option<Self> {
        let schema = PgSchema::create().await?;
        let redis = PrivateRedis::start().await?;
        let direct = upcoach_testing::service_addr(schema.url());
        let database = database_url(&schema, direct, &format!("upcoach-outage-{name}"));
        let server = start(database, &redis.url(), name, true).await;
        let admin = dev_token(&server, &["admin"]).await;
        let access = admin["access_token"].as_str().unwrap().to_owned();
        Some(Self {
            server,
            redis,
            admin,
            access,
            _schema: schema,
        })
    }

    /// A WebSocket of the admin's, subscribed to [`ROOM`].
    async fn reader(&self) -> support::Ws {
        let mut ws = support::ws(&self.server, &self.access).await;
        ws.send(Message::Text(
            json!({"type": "subscribe", "room": ROOM})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "subscribed");
        ws
    }

    /// `POST /api/dashboard/realtime/broadcast/{ROOM}` with `data`, and how long it
    /// took (checked against [`REDIS_BOUND`]).
    async fn broadcast(&self, data: Value) -> Answer {
        let (sent, took) = timed(self.server.send(
            Method::POST,
            &format!("/api/dashboard/realtime/broadcast/{ROOM}"),
            Some(json!({"event": "note", "data": data})),
            Some(&self.access),
        ))
        .await;
        assert!(took < REDIS_BOUND, "a broadcast took {took:?}");
        sent
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_by_debug_sleep() {
    let Some(on) = OnPrivateRedis::start("freeze").await else {
        return;
    };
    let (server, access) = (&on.server, on.access.as_str());
    let analytics = "/api/analytics/security-events?window=1h";
    let primed = server.get_as(analytics, Some(access)).await;
    assert_eq!(primed.status, StatusCode::OK, "{}", primed.json);

    let frozen = on.redis.freeze(10.0).await;
    // Sign-in routes fail closed: their rate limit cannot be counted.
    let (refresh, took) = timed(server.refresh(&on.admin["refresh_token"], &[])).await;
    assert_eq!(
        refresh.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refresh.json
    );
    assert_eq!(refresh.code(), "rate_limiter_unavailable");
    assert!(took < REDIS_BOUND, "refresh took {took:?}");
    // The rest answers: tokens and users need no Redis, the cache serves its L1.
    let (me, took) = timed(server.get_as("/auth/me", Some(access))).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.json);
    assert!(took < REDIS_BOUND, "me took {took:?}");
    let (cached, took) = timed(server.get_as(analytics, Some(access))).await;
    assert_eq!(cached.status, StatusCode::OK, "{}", cached.json);
    assert!(took < REDIS_BOUND, "analytics took {took:?}");
    // A broadcast cannot be numbered without Redis: 503, not a silent drop.
    let broadcast = on.broadcast(json!({})).await;
    assert_eq!(
        broadcast.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        broadcast.json
    );
    assert_eq!(broadcast.code(), "broker_unavailable");
    let health = until_down(server, "redis").await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        frozen.elapsed() < Duration::from_secs(10),
        "precondition: every check above ran while Redis slept"
    );

    until_healthy(server).await;
    let rotated = refresh_when_back(server, &on.admin["refresh_token"]).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.json);
    assert_no_panics();
    on.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty() {
    let Some(mut on) = OnPrivateRedis::start("restart").await else {
        return;
    };
    let mut ws = on.reader().await;
    for i in 1..=3u64 {
        let sent = on.broadcast(json!({"i": i})).await;
        assert_eq!(sent.json["seq"], i, "{}", sent.json);
        assert_eq!(next_delivery(&mut ws).await["seq"], i);
    }

    on.redis.restart().await;
    // The first broadcast after the restart is numbered 1 again (retried while the
    // server's connection comes back).
    let deadline = Instant::now() + RECOVERY;
    let sent = loop {
        let sent = on.broadcast(json!({"after": true})).await;
        if sent.status == StatusCode::ACCEPTED {
            break sent;
        }
        assert_eq!(sent.code(), "broker_unavailable", "{}", sent.json);
        assert!(Instant::now() < deadline, "broadcasts never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(sent.json["seq"], 1, "the room's count was lost with Redis");
    // The live reader is told, then gets the event; it does not wait for seq 4.
    let reset = next_delivery(&mut ws).await;
    assert_eq!(
        (
            &reset["type"],
            &reset["room"],
            &reset["reason"],
            &reset["seq"]
        ),
        (
            &json!("reset"),
            &json!(ROOM),
            &json!("room_restarted"),
            &json!(0)
        ),
        "{reset}"
    );
    let event = next_delivery(&mut ws).await;
    assert_eq!(event["seq"], 1, "{event}");
    assert_eq!(event["data"], json!({"after": true}));

    until_healthy(&on.server).await;
    // Sign-in's rate limits start again from zero (their counts were in Redis), and
    // refresh families, in Postgres, are untouched.
    let rotated = refresh_when_back(&on.server, &on.admin["refresh_token"]).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.json);
    assert!(rotated.headers.contains_key("ratelimit"), "counted again");
    assert_no_panics();
    on.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killing_every_client_connection() {
    let Some(on) = OnPrivateRedis::start("kill").await else {
        return;
    };
    let mut ws = on.reader().await;

    // Broadcasts before, during and after every Redis connection of the server is
    // killed: each is either acknowledged (202) or refused (503 `broker_unavailable`),
    // and the reader gets every acknowledged one once, in order, with no reset.
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..40u64 {
        if i == 10 {
            assert!(on.redis.kill_clients().await >= 1);
        }
        let sent = on.broadcast(json!({"i": i})).await;
        match sent.status {
            StatusCode::ACCEPTED => acknowledged.push(sent.json["seq"].as_u64().unwrap()),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(sent.code(), "broker_unavailable", "{}", sent.json);
                refused += 1;
            }
            other => panic!("broadcast {i}: {other} {}", sent.json),
        }
    }
    assert!(
        refused <= 3,
        "{refused} broadcasts refused after one CLIENT KILL"
    );
    let newest = *acknowledged.last().unwrap();
    let mut read = Vec::new();
    while read.last().is_none_or(|&seq| seq < newest) {
        let message = next_delivery(&mut ws).await;
        assert_eq!(message["type"], "event", "{message}");
        read.push(message["seq"].as_u64().unwrap());
    }
    // A broadcast refused on a lost answer may still have been numbered: the reader's
    // stream is every seq, once, and holds each acknowledged one.
    let every: Vec<u64> = (1..=newest).collect();
    assert_eq!(read, every, "once each, in order");
    until_healthy(&on.server).await;
    let rotated = refresh_when_back(&on.server, &on.admin["refresh_token"]).await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.json);
    assert_no_panics();
    on.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_ends_the_sign_ins_in_flight_cleanly() {
    let Some(schema) = PgSchema::create().await else {
        return;
    };
    let Some(mut redis) = PrivateRedis::start().await else {
        return;
    };
    let Some(google) = upcoach_testing::OidcProvider::start().await else {
        return;
    };
    let direct = upcoach_testing::service_addr(schema.url());
    let mut env = google_env(&google);
    env.push(("REDIS_URL", redis.url()));
    env.push((
        "DATABASE_URL",
        database_url_text(&schema, direct, "upcoach-outage-flows"),
    ));
    count_panics();
    let server = Running::from_env(&env, |_| {}).await;

    // A browser is at the provider when Redis restarts: its flow (state, nonce, PKCE
    // verifier) was in Redis and is gone.
    let mut browser = Browser::default();
    let callback = browser
        .start(
            &server,
            "google",
            "platform=web",
            &json!({"sub": "in-flight"}),
        )
        .await;
    redis.restart().await;
    // The first command on a connection the restart closed fails while it reconnects:
    // the sign-in rate limit fails closed (503, nothing consumed), and a reload gets
    // the real answer.
    let mut unavailable = 0;
    let landed = loop {
        let (landed, took) = timed(browser.callback(&callback)).await;
        assert!(took < REDIS_BOUND, "the callback took {took:?}");
        if landed.status != StatusCode::SERVICE_UNAVAILABLE {
            break landed;
        }
        assert_eq!(landed.code(), "rate_limiter_unavailable", "{}", landed.json);
        unavailable += 1;
        assert!(unavailable <= 3, "still 503 after {unavailable} reloads");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (landed.status, landed.code()),
        (StatusCode::UNAUTHORIZED, "state_invalid".to_owned()),
        "{}",
        landed.json
    );
    // Signing in again works at once: a new flow on the new Redis.
    let deadline = Instant::now() + RECOVERY;
    let answer = loop {
        let mut browser = Browser::default();
        let answer = browser
            .sign_in(
                &server,
                "google",
                "platform=web",
                &json!({"sub": "in-flight"}),
            )
            .await;
        if answer.status != StatusCode::SERVICE_UNAVAILABLE || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert!(answer.json["refresh_token"].is_string());
    assert_no_panics();
    server.stop().await;
}
