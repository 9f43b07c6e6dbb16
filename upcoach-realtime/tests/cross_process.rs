//! Two processes: two hubs, each on its own Redis broadcaster (its own connections,
//! the same key prefix), each behind its own server. Events published on one reach
//! the other's clients once and in order; a cursor taken on one resumes exactly on the
//! other; a cursor older than history gets `reset`; a Redis outage on one process
//! leaves no silent gap.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use upcoach_realtime::{
    Cursor, HistoryLimits, Hub, Position, RedisBroadcaster, RedisBroadcasterOptions, Replay,
    RoomEvent,
};
use upcoach_testing::{FaultProxy, RedisPrefix};

use support::{Record, Sse, Tokens, Ws, until};

const X: &str = "public:x";
const Y: &str = "public:y";

/// How long a client may wait for its next expected message before the test names
/// what is missing.
const NEXT: Duration = Duration::from_secs(5);

/// One process: a hub on its own Redis broadcaster, behind its own server.
struct Process {
    hub: Hub,
    addr: SocketAddr,
}

impl Process {
    async fn start(url: &str, options: RedisBroadcasterOptions, tokens: Arc<Tokens>) -> Self {
        let broadcaster = RedisBroadcaster::connect(url, options)
            .await
            .expect("Redis answers");
        let hub = Hub::builder(Arc::new(broadcaster), tokens).build();
        let addr = support::serve(hub.clone()).await;
        Self { hub, addr }
    }

    async fn until_connected(&self, name: &str) {
        let hub = self.hub.clone();
        until(&format!("{name} is connected to Redis"), NEXT, move || {
            hub.status().broker.connected
        })
        .await;
    }
}

/// Two processes on one key prefix, sharing a token issuer (as two servers share a
/// signing key).
struct Cluster {
    a: Process,
    b: Process,
    tokens: Arc<Tokens>,
    _prefix: RedisPrefix,
}

impl Cluster {
    /// `None` (skip) without `REDIS_URL`.
    async fn start(history: HistoryLimits) -> Option<Self> {
        Some(Self::start_on(RedisPrefix::create()?, history).await)
    }

    /// On a Redis Cluster (`None`, skip, without `REDIS_CLUSTER_URL`): B lists the seeds
    /// from the second on, so the two processes' subscriptions sit on different nodes
    /// and every live event crosses the cluster bus to reach one of them.
    async fn start_on_redis_cluster(history: HistoryLimits) -> Option<Self> {
        Some(Self::start_on(RedisPrefix::on_cluster()?, history).await)
    }

    async fn start_on(prefix: RedisPrefix, history: HistoryLimits) -> Self {
        let tokens = Arc::new(Tokens::default());
        let a = Process::start(prefix.url(), options(&prefix, history), tokens.clone()).await;
        let b_url = if prefix.is_cluster() {
            upcoach_testing::rotated_cluster_url(prefix.url(), 1)
        } else {
            prefix.url().to_owned()
        };
        let b = Process::start(&b_url, options(&prefix, history), tokens.clone()).await;
        a.until_connected("A").await;
        b.until_connected("B").await;
        Self {
            a,
            b,
            tokens,
            _prefix: prefix,
        }
    }
}

fn options(prefix: &RedisPrefix, history: HistoryLimits) -> RedisBroadcasterOptions {
    RedisBroadcasterOptions {
        prefix: prefix.key("rt"),
        history,
        ..RedisBroadcasterOptions::default()
    }
}

/// Rooms of the interleaved tests: X and Y mixed, about two X for each Y.
fn interleaved(i: usize) -> &'static str {
    if (i + i / 3).is_multiple_of(2) { X } else { Y }
}

fn only_x(_: usize) -> &'static str {
    X
}

/// Publishes `count` events on `hub`, event `i` in room `room(i)`, each payload naming
/// `tag` and `i` so a misplaced one is recognisable.
async fn publish(
    hub: &Hub,
    count: usize,
    tag: &str,
    room: fn(usize) -> &'static str,
) -> Vec<Arc<RoomEvent>> {
    let mut sent = Vec::with_capacity(count);
    for i in 0..count {
        let event = hub
            .publish(room(i), "tick", json!({ "tag": tag, "i": i }))
            .await
            .expect("publish");
        sent.push(event);
    }
    sent
}

/// One room's events as a client saw them, or as they were published: `(seq, data)`.
type Stream = Vec<(u64, Value)>;

fn by_room(events: &[Arc<RoomEvent>]) -> HashMap<String, Stream> {
    let mut rooms: HashMap<String, Stream> = HashMap::new();
    for event in events {
        rooms
            .entry(event.room.clone())
            .or_default()
            .push((event.seq, event.data.clone()));
    }
    rooms
}

fn counts(events: &[Arc<RoomEvent>]) -> Vec<(String, usize)> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for event in events {
        match counts.iter_mut().find(|(room, _)| *room == event.room) {
            Some((_, n)) => *n += 1,
            None => counts.push((event.room.clone(), 1)),
        }
    }
    counts
}

fn last_seq(events: &[Arc<RoomEvent>], room: &str) -> u64 {
    last_position(events, room).seq
}

fn last_position(events: &[Arc<RoomEvent>], room: &str) -> Position {
    events
        .iter()
        .rev()
        .find(|e| e.room == room)
        .map(|e| e.position())
        .expect("the room has events")
}

/// `1-20,22,24-30`: a sequence list short enough for a failure message.
fn ranges(seqs: impl IntoIterator<Item = u64>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    let flush = |run: (u64, u64), out: &mut Vec<String>| {
        out.push(if run.0 == run.1 {
            run.0.to_string()
        } else {
            format!("{}-{}", run.0, run.1)
        });
    };
    for seq in seqs {
        run = match run {
            Some((start, end)) if seq == end + 1 => Some((start, seq)),
            Some(done) => {
                flush(done, &mut out);
                Some((seq, seq))
            }
            None => Some((seq, seq)),
        };
    }
    if let Some(done) = run {
        flush(done, &mut out);
    }
    format!("[{}]", out.join(","))
}

fn summary(got: &HashMap<String, Stream>) -> String {
    let mut rooms: Vec<_> = got.iter().collect();
    rooms.sort_by(|a, b| a.0.cmp(b.0));
    rooms
        .iter()
        .map(|(room, stream)| format!("{room} {}", ranges(stream.iter().map(|(s, _)| *s))))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every room of `want` was seen exactly as published: same events, same order, none
/// twice, none missing, nothing else.
fn assert_streams(what: &str, got: &HashMap<String, Stream>, want: &[Arc<RoomEvent>]) {
    let want = by_room(want);
    for room in got.keys() {
        assert!(
            want.contains_key(room),
            "{what}: events of {room} that were not expected: {}",
            summary(got)
        );
    }
    for (room, expected) in &want {
        let seen = got.get(room).map(Vec::as_slice).unwrap_or_default();
        let describe = || {
            format!(
                "{what}, room {room}: got seqs {}, expected {}",
                ranges(seen.iter().map(|(s, _)| *s)),
                ranges(expected.iter().map(|(s, _)| *s))
            )
        };
        assert_eq!(seen.len(), expected.len(), "{}", describe());
        for (i, (seen, expected)) in seen.iter().zip(expected).enumerate() {
            assert_eq!(seen.0, expected.0, "message {i}: {}", describe());
            assert_eq!(seen.1, expected.1, "message {i} (seq {}): payload", seen.0);
        }
    }
}

/// What an SSE client read: events per room, and the last `id:`.
struct SseRead {
    events: HashMap<String, Stream>,
    last_id: String,
}

/// The next record carrying an event, within [`NEXT`].
async fn next_sse_event(sse: &mut Sse, so_far: &HashMap<String, Stream>) -> Record {
    match tokio::time::timeout(NEXT, sse.next_event()).await {
        Ok(record) => record,
        Err(_) => panic!(
            "no SSE event for {NEXT:?}; read so far: {}",
            summary(so_far)
        ),
    }
}

/// Checks an event record (its `event:`, its `data:` fields, its `id:` naming the
/// event's seq for its room) and returns `(room, seq, data)`.
fn sse_event(record: &Record) -> (String, u64, Value) {
    let name = record.event.as_deref().expect("an event record");
    let text = record.data.as_deref().expect("an event has data");
    assert_ne!(name, "reset", "unexpected reset: {text}");
    let body: Value = serde_json::from_str(text).expect("data is JSON");
    let room = body["room"].as_str().expect("data.room").to_owned();
    let seq = body["seq"].as_u64().expect("data.seq");
    let epoch = body["epoch"].as_u64().expect("data.epoch") as u32;
    assert_ne!(epoch, 0, "data.epoch: {body}");
    assert_eq!(body["event"], name, "event: matches data.event");
    assert!(body["ts"].as_u64().is_some(), "data.ts: {body}");
    let id = record.id.as_deref().expect("an event record has an id");
    let cursor: Cursor = id.parse().expect("the id is a cursor");
    assert_eq!(
        cursor.get(&room),
        Some(Position::new(seq, epoch)),
        "the id {id} carries the event's position"
    );
    (room, seq, body["data"].clone())
}

/// Reads SSE events until each room has `want` of them; fails on a `reset` or when
/// the next event does not come.
async fn read_sse(sse: &mut Sse, want: &[(String, usize)]) -> SseRead {
    let mut events: HashMap<String, Stream> = HashMap::new();
    let mut last_id = String::new();
    while want
        .iter()
        .any(|(room, n)| events.get(room).map_or(0, Vec::len) < *n)
    {
        let record = next_sse_event(sse, &events).await;
        let (room, seq, data) = sse_event(&record);
        events.entry(room).or_default().push((seq, data));
        last_id = record.id.expect("checked above");
    }
    SseRead { events, last_id }
}

/// The next JSON message, within [`NEXT`].
async fn next_ws(ws: &mut Ws, so_far: &HashMap<String, Stream>) -> Value {
    match tokio::time::timeout(NEXT, support::recv(ws)).await {
        Ok(message) => message,
        Err(_) => panic!(
            "no WebSocket message for {NEXT:?}; read so far: {}",
            summary(so_far)
        ),
    }
}

/// What a WebSocket client read: events per room, and `subscribed` heads.
#[derive(Default)]
struct WsRead {
    events: HashMap<String, Stream>,
    subscribed: HashMap<String, u64>,
}

/// Reads until each room has `want` events; fails on `reset` and `error`.
async fn read_ws(ws: &mut Ws, want: &[(String, usize)]) -> WsRead {
    let mut read = WsRead::default();
    while want
        .iter()
        .any(|(room, n)| read.events.get(room).map_or(0, Vec::len) < *n)
    {
        let message = next_ws(ws, &read.events).await;
        let room = message["room"].as_str().unwrap_or_default().to_owned();
        match message["type"].as_str() {
            Some("event") => {
                let seq = message["seq"].as_u64().expect("event.seq");
                assert_eq!(message["event"], "tick", "{message}");
                assert!(message["ts"].as_u64().is_some(), "{message}");
                read.events
                    .entry(room)
                    .or_default()
                    .push((seq, message["data"].clone()));
            }
            Some("subscribed") => {
                let seq = message["seq"].as_u64().expect("subscribed.seq");
                assert!(
                    read.subscribed.insert(room, seq).is_none(),
                    "subscribed twice: {message}"
                );
            }
            _ => panic!("unexpected message: {message}"),
        }
    }
    read
}

async fn subscribe_since(ws: &mut Ws, room: &str, since: u64) {
    support::send(
        ws,
        json!({"type": "subscribe", "room": room, "since": since}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_published_on_b_reach_a_websocket_on_a_in_order_once() {
    if let Some(cluster) = Cluster::start(HistoryLimits::default()).await {
        reach_a_websocket_on_a(cluster).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_redis_cluster_events_published_on_b_reach_a_websocket_on_a() {
    if let Some(cluster) = Cluster::start_on_redis_cluster(HistoryLimits::default()).await {
        reach_a_websocket_on_a(cluster).await;
    }
}

async fn reach_a_websocket_on_a(cluster: Cluster) {
    let token = cluster.tokens.admin();
    let mut client = support::ws(cluster.a.addr, Some(&token)).await;
    assert_eq!(support::subscribe(&mut client, X, None).await, 0);

    let sent = publish(&cluster.b.hub, 200, "b", only_x).await;
    assert_eq!(
        sent.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>(),
        "B numbers the room from 1"
    );
    let read = read_ws(&mut client, &counts(&sent)).await;
    assert_streams("A's WebSocket", &read.events, &sent);

    // Nothing is delivered twice: the next message is the next event.
    let next = publish(&cluster.b.hub, 1, "after", only_x).await;
    let read = read_ws(&mut client, &counts(&next)).await;
    assert_streams("A's WebSocket after the 200", &read.events, &next);
    assert_eq!(cluster.a.hub.stats().resets, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sse_cursor_taken_on_a_resumes_exactly_on_b() {
    if let Some(cluster) = Cluster::start(HistoryLimits::default()).await {
        sse_cursor_resumes_on_b(cluster).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_redis_cluster_an_sse_cursor_taken_on_a_resumes_exactly_on_b() {
    if let Some(cluster) = Cluster::start_on_redis_cluster(HistoryLimits::default()).await {
        sse_cursor_resumes_on_b(cluster).await;
    }
}

async fn sse_cursor_resumes_on_b(cluster: Cluster) {
    let auth = format!("Bearer {}", cluster.tokens.admin());
    let mut first = support::sse(
        cluster.a.addr,
        "rooms=public:x,public:y",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(first.status, 200);
    let opening = first.next().await.expect("an opening record");
    assert_eq!(opening.retry, Some(3000));
    assert_eq!(opening.id.as_deref(), Some("public:x=0,public:y=0"));

    let seen = publish(&cluster.b.hub, 5, "seen", interleaved).await;
    let read = read_sse(&mut first, &counts(&seen)).await;
    assert_streams("A's first stream", &read.events, &seen);
    let cursor = read.last_id;
    let parsed: Cursor = cursor.parse().unwrap();
    assert_eq!(parsed.get(X), Some(last_position(&seen, X)));
    assert_eq!(parsed.get(Y), Some(last_position(&seen, Y)));
    drop(first);

    let missed = publish(&cluster.b.hub, 500, "missed", interleaved).await;
    let mut resumed = support::sse(
        cluster.b.addr,
        "rooms=public:x,public:y",
        &[("authorization", &auth), ("last-event-id", &cursor)],
    )
    .await;
    assert_eq!(resumed.status, 200);
    let opening = resumed.next().await.expect("an opening record");
    assert_eq!(
        opening.id.as_deref(),
        Some(cursor.as_str()),
        "B starts from A's cursor"
    );
    let read = read_sse(&mut resumed, &counts(&missed)).await;
    assert_streams("B's resumed stream, missed events", &read.events, &missed);
    let parsed: Cursor = read.last_id.parse().unwrap();
    assert_eq!(parsed.get(X), Some(last_position(&missed, X)));
    assert_eq!(parsed.get(Y), Some(last_position(&missed, Y)));

    // Then live events, published on A this time, and nothing twice.
    let live = publish(&cluster.a.hub, 10, "live", interleaved).await;
    let read = read_sse(&mut resumed, &counts(&live)).await;
    assert_streams("B's resumed stream, live events", &read.events, &live);
    let sentinel = publish(&cluster.b.hub, 1, "sentinel", only_x).await;
    let read = read_sse(&mut resumed, &counts(&sentinel)).await;
    assert_streams("B's resumed stream, the sentinel", &read.events, &sentinel);
    assert_eq!(cluster.b.hub.stats().resets, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_websocket_position_taken_on_a_resumes_exactly_on_b() {
    let Some(cluster) = Cluster::start(HistoryLimits::default()).await else {
        return;
    };
    let token = cluster.tokens.admin();
    let mut first = support::ws(cluster.a.addr, Some(&token)).await;
    assert_eq!(support::subscribe(&mut first, X, None).await, 0);
    assert_eq!(support::subscribe(&mut first, Y, None).await, 0);
    let seen = publish(&cluster.b.hub, 5, "seen", interleaved).await;
    let read = read_ws(&mut first, &counts(&seen)).await;
    assert_streams("A's first connection", &read.events, &seen);
    let since_x = read.events[X].last().unwrap().0;
    let since_y = read.events[Y].last().unwrap().0;
    drop(first);

    let missed = publish(&cluster.b.hub, 500, "missed", interleaved).await;
    let mut resumed = support::ws(cluster.b.addr, Some(&token)).await;
    subscribe_since(&mut resumed, X, since_x).await;
    subscribe_since(&mut resumed, Y, since_y).await;
    let read = read_ws(&mut resumed, &counts(&missed)).await;
    assert_eq!(
        read.subscribed,
        HashMap::from([
            (X.to_owned(), last_seq(&missed, X)),
            (Y.to_owned(), last_seq(&missed, Y)),
        ]),
        "each subscribed names the room's head"
    );
    assert_streams("B's connection, missed events", &read.events, &missed);

    let live = publish(&cluster.a.hub, 10, "live", interleaved).await;
    let read = read_ws(&mut resumed, &counts(&live)).await;
    assert_streams("B's connection, live events", &read.events, &live);
    let sentinel = publish(&cluster.b.hub, 1, "sentinel", only_x).await;
    let read = read_ws(&mut resumed, &counts(&sentinel)).await;
    assert_streams("B's connection, the sentinel", &read.events, &sentinel);
    assert_eq!(cluster.b.hub.stats().resets, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cursor_older_than_redis_history_gets_reset_then_live_events() {
    let history = HistoryLimits {
        max_events: 5,
        ..HistoryLimits::default()
    };
    let Some(cluster) = Cluster::start(history).await else {
        return;
    };
    let token = cluster.tokens.admin();
    let auth = format!("Bearer {token}");
    let mut first = support::sse(
        cluster.a.addr,
        "rooms=public:x",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(first.status, 200);
    let early = publish(&cluster.b.hub, 2, "early", only_x).await;
    let read = read_sse(&mut first, &counts(&early)).await;
    assert_streams("A's first stream", &read.events, &early);
    let cursor = read.last_id;
    let epoch = early[0].epoch;
    assert_eq!(cursor, format!("public:x=2@{epoch}"));
    drop(first);

    // `MAXLEN ~ 5` trims whole stream nodes (100 entries or 4 KiB each): several
    // hundred events push the cursor's position out of history.
    let trimmed = publish(&cluster.b.hub, 400, "trimmed", only_x).await;
    let head = last_seq(&trimmed, X);
    assert_eq!(head, 402);
    assert_eq!(
        cluster
            .a
            .hub
            .broadcaster()
            .replay(X, 2.into(), 10)
            .await
            .unwrap(),
        Replay::Gone {
            reason: "history_expired"
        },
        "precondition: Redis trimmed the room's history past the cursor"
    );

    // SSE, resumed on A: a reset naming the room, and an id that moves to the head.
    let mut resumed = support::sse(
        cluster.a.addr,
        "rooms=public:x",
        &[("authorization", &auth), ("last-event-id", &cursor)],
    )
    .await;
    assert_eq!(resumed.status, 200);
    let opening = resumed.next().await.expect("an opening record");
    assert_eq!(
        opening.id.as_deref(),
        Some(format!("{X}={head}@{epoch}").as_str()),
        "history is gone, so the stream starts at the head"
    );
    let reset = next_sse_event(&mut resumed, &HashMap::new()).await;
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    let data: Value = serde_json::from_str(reset.data.as_deref().unwrap()).unwrap();
    assert_eq!(data, json!({"room": X, "reason": "history_expired"}));
    assert_eq!(
        reset.id.as_deref(),
        Some(format!("{X}={head}@{epoch}").as_str()),
        "after a reset the cursor stands at the room's head"
    );

    // WebSocket, resumed on B: subscribed at the head, then reset.
    let mut ws = support::ws(cluster.b.addr, Some(&token)).await;
    subscribe_since(&mut ws, X, 2).await;
    let subscribed = next_ws(&mut ws, &HashMap::new()).await;
    assert_eq!(
        subscribed,
        json!({"type": "subscribed", "room": X, "seq": head, "epoch": epoch})
    );
    let reset = next_ws(&mut ws, &HashMap::new()).await;
    assert_eq!(reset, ws_reset("history_expired", head, epoch));

    // Live events follow on both, from the head on.
    let live = publish(&cluster.b.hub, 3, "live", only_x).await;
    assert_eq!(live[0].seq, head + 1);
    let read = read_sse(&mut resumed, &counts(&live)).await;
    assert_streams("A's stream after the reset", &read.events, &live);
    let read = read_ws(&mut ws, &counts(&live)).await;
    assert_streams("B's WebSocket after the reset", &read.events, &live);
    assert_eq!(cluster.a.hub.stats().resets, 1);
    assert_eq!(cluster.b.hub.stats().resets, 1);
}

/// Two connected processes: A reaches Redis (commands and pub/sub) only through the
/// returned proxy, with 300 ms timeouts and 200 ms pings; B directly.
async fn proxied_pair(prefix: &RedisPrefix) -> (FaultProxy, Process, Process, Arc<Tokens>) {
    let proxy = FaultProxy::start(upcoach_testing::service_addr(prefix.url())).await;
    let via_proxy = upcoach_testing::url_via(prefix.url(), proxy.addr());
    let tokens = Arc::new(Tokens::default());
    let quick = RedisBroadcasterOptions {
        timeout: Duration::from_millis(300),
        ping_interval: Duration::from_millis(200),
        ..options(prefix, HistoryLimits::default())
    };
    let a = Process::start(&via_proxy, quick, tokens.clone()).await;
    let b = Process::start(
        prefix.url(),
        options(prefix, HistoryLimits::default()),
        tokens.clone(),
    )
    .await;
    a.until_connected("A").await;
    b.until_connected("B").await;
    (proxy, a, b, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_on_one_process_leaves_no_silent_gap() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let (proxy, a, b, tokens) = proxied_pair(&prefix).await;

    let token = tokens.admin();
    let auth = format!("Bearer {token}");
    let mut sse = support::sse(a.addr, "rooms=public:x", &[("authorization", &auth)]).await;
    assert_eq!(sse.status, 200);
    let mut ws = support::ws(a.addr, Some(&token)).await;
    assert_eq!(support::subscribe(&mut ws, X, None).await, 0);

    let before = publish(&b.hub, 20, "before", only_x).await;
    let read = read_sse(&mut sse, &counts(&before)).await;
    assert_streams("A's SSE before the cut", &read.events, &before);
    let read = read_ws(&mut ws, &counts(&before)).await;
    assert_streams("A's WebSocket before the cut", &read.events, &before);

    // While Redis is healthy, A stays connected: its liveness pings (every 200 ms)
    // pass on a connection that has subscriptions, and nothing reconnects.
    let links = proxy.forwarded();
    let steady = tokio::time::Instant::now() + Duration::from_millis(1_000);
    while tokio::time::Instant::now() < steady {
        assert!(
            a.hub.status().broker.connected,
            "A reported the broker down while Redis was healthy"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        proxy.forwarded(),
        links,
        "A opened new Redis connections while Redis was healthy"
    );

    proxy.cut();
    let hub = a.hub.clone();
    until("A sees the broker down", NEXT, move || {
        !hub.status().broker.connected
    })
    .await;
    let during = publish(&b.hub, 30, "during", only_x).await;
    // Long enough for several failed reconnects and pings.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !a.hub.status().broker.connected,
        "A cannot be connected while the proxy is cut"
    );

    proxy.restore();
    a.until_connected("A, after the restore").await;
    // What was published during the outage arrives without waiting for a later event:
    // the reconnect fills the hole from history.
    let read = read_sse(&mut sse, &counts(&during)).await;
    assert_streams("A's SSE, the outage's events", &read.events, &during);
    let read = read_ws(&mut ws, &counts(&during)).await;
    assert_streams("A's WebSocket, the outage's events", &read.events, &during);

    let after = publish(&b.hub, 20, "after", only_x).await;
    let read = read_sse(&mut sse, &counts(&after)).await;
    assert_streams("A's SSE after the restore", &read.events, &after);
    let read = read_ws(&mut ws, &counts(&after)).await;
    assert_streams("A's WebSocket after the restore", &read.events, &after);
    assert_eq!(a.hub.stats().resets, 0, "history had every missed event");
    drop(prefix);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_link_that_goes_silent_is_replaced_with_no_gap() {
    let Some(prefix) = RedisPrefix::create() else {
        return;
    };
    let (proxy, a, b, tokens) = proxied_pair(&prefix).await;

    let token = tokens.admin();
    let auth = format!("Bearer {token}");
    let mut sse = support::sse(a.addr, "rooms=public:x", &[("authorization", &auth)]).await;
    assert_eq!(sse.status, 200);
    let before = publish(&b.hub, 10, "before", only_x).await;
    let read = read_sse(&mut sse, &counts(&before)).await;
    assert_streams("A's SSE before the stall", &read.events, &before);

    // Every link of A to Redis goes silent but stays open: no error, no close. Only
    // A's pings can tell, and new links work.
    let links = proxy.forwarded();
    proxy.stall();
    let during = publish(&b.hub, 30, "during", only_x).await;
    let read = read_sse(&mut sse, &counts(&during)).await;
    assert_streams(
        "A's SSE, the events sent while silent",
        &read.events,
        &during,
    );
    assert!(proxy.forwarded() > links, "A made new links");
    a.until_connected("A, on its new link").await;

    let after = publish(&b.hub, 10, "after", only_x).await;
    let read = read_sse(&mut sse, &counts(&after)).await;
    assert_streams("A's SSE after the stall", &read.events, &after);
    assert_eq!(a.hub.stats().resets, 0, "history had every missed event");
    drop(prefix);
}

// Outages that act on the Redis server itself, on a `redis-server` of the test's own
// (the shared one is never restarted or frozen).

/// One process on the private Redis at `url`, with 300 ms timeouts and 200 ms pings.
async fn quick_process(url: &str, tokens: Arc<Tokens>) -> Process {
    let options = RedisBroadcasterOptions {
        prefix: "rt".into(),
        timeout: Duration::from_millis(300),
        ping_interval: Duration::from_millis(200),
        ..RedisBroadcasterOptions::default()
    };
    let process = Process::start(url, options, tokens).await;
    process.until_connected("the process").await;
    process
}

/// An SSE stream of an admin on `process`, reading X.
async fn x_reader(process: &Process, tokens: &Tokens) -> Sse {
    let auth = format!("Bearer {}", tokens.admin());
    let sse = support::sse(process.addr, "rooms=public:x", &[("authorization", &auth)]).await;
    assert_eq!(sse.status, 200);
    sse
}

/// Publishes `count` events in X on `hub` and checks that `sse` reads exactly them.
async fn publish_and_read(hub: &Hub, sse: &mut Sse, count: usize, what: &str) {
    let sent = publish(hub, count, what, only_x).await;
    let read = read_sse(sse, &counts(&sent)).await;
    assert_streams(what, &read.events, &sent);
}

/// Publishes `count` events in `room` on `hub`, retrying each for up to 10 s while
/// Redis does not take it; the events Redis acknowledged (a retried one may have been
/// numbered twice when an answer was lost: both are then in the room).
async fn publish_through(hub: &Hub, count: usize, tag: &str) -> Vec<Arc<RoomEvent>> {
    let mut sent = Vec::with_capacity(count);
    for i in 0..count {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match hub.publish(X, "tick", json!({ "tag": tag, "i": i })).await {
                Ok(event) => {
                    sent.push(event);
                    break;
                }
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "Redis did not take event {i} of {tag} within 10 s: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    sent
}

/// Reads SSE records until `want` events have come after a `reset` of X; fails on an
/// event before the reset. The reset's reason and the events.
async fn read_sse_after_reset(sse: &mut Sse, want: usize) -> (Value, HashMap<String, Stream>) {
    let reset = next_sse_event(sse, &HashMap::new()).await;
    assert_eq!(
        reset.event.as_deref(),
        Some("reset"),
        "a reset first, not an event of the old numbering: {reset:?}"
    );
    let data: Value = serde_json::from_str(reset.data.as_deref().unwrap()).unwrap();
    let read = read_sse(sse, &[(X.to_owned(), want)]).await;
    (data, read.events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restart_that_loses_every_key_resets_live_readers_then_delivers() {
    let Some(mut redis) = upcoach_testing::PrivateRedis::start().await else {
        return;
    };
    let tokens = Arc::new(Tokens::default());
    let a = quick_process(&redis.url(), tokens.clone()).await;
    let token = tokens.admin();
    let auth = format!("Bearer {token}");
    let mut sse = support::sse(a.addr, "rooms=public:x", &[("authorization", &auth)]).await;
    assert_eq!(sse.status, 200);
    let mut ws = support::ws(a.addr, Some(&token)).await;
    assert_eq!(support::subscribe(&mut ws, X, None).await, 0);

    let before = publish(&a.hub, 20, "before", only_x).await;
    let read = read_sse(&mut sse, &counts(&before)).await;
    assert_streams("SSE before the restart", &read.events, &before);
    let old_cursor = read.last_id;
    let old_epoch = before[0].epoch;
    assert_eq!(old_cursor, format!("public:x=20@{old_epoch}"));
    let read = read_ws(&mut ws, &counts(&before)).await;
    assert_streams("WebSocket before the restart", &read.events, &before);

    // Killed without a goodbye and started again empty: the room's count starts at 1.
    redis.restart().await;
    let after = publish_through(&a.hub, 5, "after").await;
    assert_eq!(
        after.first().map(|e| e.seq),
        Some(1),
        "precondition: the restarted Redis numbers the room from 1"
    );

    // Neither reader waits for the count to pass 20 (which would drop these events
    // silently): each is told `reset`, then gets the new events once, in order.
    assert_ne!(after[0].epoch, old_epoch, "precondition: a new numbering");
    let (reset, events) = read_sse_after_reset(&mut sse, after.len()).await;
    assert_eq!(reset, json!({"room": X, "reason": "room_restarted"}));
    assert_streams("SSE after the restart", &events, &after);
    let message = next_ws(&mut ws, &HashMap::new()).await;
    assert_eq!(message, ws_reset("room_restarted", 0, after[0].epoch));
    let read = read_ws(&mut ws, &counts(&after)).await;
    assert_streams("WebSocket after the restart", &read.events, &after);
    assert_eq!(a.hub.stats().resets, 1, "one reset, fanned out to both");

    // A reader coming back with a cursor of the old numbering: reset, then live.
    let mut resumed = support::sse(
        a.addr,
        "rooms=public:x",
        &[("authorization", &auth), ("last-event-id", &old_cursor)],
    )
    .await;
    assert_eq!(resumed.status, 200);
    let head = after.last().unwrap().position();
    let opening = resumed.next().await.expect("an opening record");
    assert_eq!(opening.id, Some(format!("{X}={}@{}", head.seq, head.epoch)));
    let live = publish(&a.hub, 3, "live", only_x).await;
    let (reset, events) = read_sse_after_reset(&mut resumed, live.len()).await;
    assert_eq!(reset, json!({"room": X, "reason": "room_restarted"}));
    assert_streams("the resumed SSE", &events, &live);
    let read = read_sse(&mut sse, &counts(&live)).await;
    assert_streams("the first SSE, live again", &read.events, &live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killing_every_client_leaves_no_gap_and_no_reset() {
    let Some(redis) = upcoach_testing::PrivateRedis::start().await else {
        return;
    };
    let tokens = Arc::new(Tokens::default());
    let a = quick_process(&redis.url(), tokens.clone()).await;
    let b = quick_process(&redis.url(), tokens.clone()).await;
    let mut sse = x_reader(&a, &tokens).await;
    publish_and_read(&b.hub, &mut sse, 10, "SSE before CLIENT KILL").await;

    // Both processes lose every connection, commands and pub/sub alike. B publishes
    // while A is still reconnecting; A fills the hole from history.
    let killed = redis.kill_clients().await;
    assert!(
        killed >= 2,
        "both processes' connections were killed: {killed}"
    );
    let during = publish_through(&b.hub, 20, "during").await;
    let read = read_sse(&mut sse, &counts(&during)).await;
    assert_streams("SSE after CLIENT KILL", &read.events, &during);
    a.until_connected("A, reconnected").await;
    assert_eq!(a.hub.stats().resets, 0, "history had every missed event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_redis_delays_events_but_loses_none() {
    let Some(redis) = upcoach_testing::PrivateRedis::start().await else {
        return;
    };
    let tokens = Arc::new(Tokens::default());
    let a = quick_process(&redis.url(), tokens.clone()).await;
    let mut sse = x_reader(&a, &tokens).await;
    publish_and_read(&a.hub, &mut sse, 10, "SSE before the freeze").await;

    // `DEBUG SLEEP 1.5`: five times A's ping timeout. A's pub/sub link is given up on
    // and replaced; a publish waits (or fails and is retried) until Redis wakes.
    redis.freeze(1.5).await;
    let hub = a.hub.clone();
    until("A notices the frozen broker", NEXT, move || {
        !hub.status().broker.connected
    })
    .await;
    let during = publish_through(&a.hub, 10, "during").await;
    a.until_connected("A, after the freeze").await;
    // A publish whose answer was lost to a timeout may have run too: the stream is
    // every seq from 11 on, each once, including every acknowledged one.
    let newest = during.last().unwrap().seq;
    let mut seen = Vec::new();
    while seen.last().is_none_or(|&seq| seq < newest) {
        let record = next_sse_event(&mut sse, &HashMap::new()).await;
        let (_, seq, _) = sse_event(&record);
        seen.push(seq);
    }
    let expected: Vec<u64> = (11..=newest).collect();
    assert_eq!(seen, expected, "each event once, in order, none missing");
    assert_eq!(a.hub.stats().resets, 0, "history had every missed event");
}

/// Keys lost while every connection stays up (`FLUSHALL` by an operator): the next
/// live event comes in numbered 1, at or below the last live one, which only a
/// restarted room can explain. Readers get `reset`, then the new events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_flushed_under_a_live_connection_reset_readers_then_deliver() {
    let Some(redis) = upcoach_testing::PrivateRedis::start().await else {
        return;
    };
    let tokens = Arc::new(Tokens::default());
    let a = quick_process(&redis.url(), tokens.clone()).await;
    let token = tokens.admin();
    let mut ws = support::ws(a.addr, Some(&token)).await;
    assert_eq!(support::subscribe(&mut ws, X, None).await, 0);
    let before = publish(&a.hub, 5, "before", only_x).await;
    let read = read_ws(&mut ws, &counts(&before)).await;
    assert_streams("before the flush", &read.events, &before);

    flush_then_read_the_restart(&redis.url(), &a.hub, &mut ws).await;
    assert_eq!(a.hub.stats().resets, 1);
}

/// Flushes every key of the Redis at `url`, publishes three events in X on `hub`, and
/// checks that `ws` (reading X on that hub) gets `reset` (`room_restarted`) at the new
/// numbering's start, then exactly those events, which it returns.
async fn flush_then_read_the_restart(url: &str, hub: &Hub, ws: &mut Ws) -> Vec<Arc<RoomEvent>> {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let after = publish(hub, 3, "after", only_x).await;
    assert_eq!(
        after[0].seq, 1,
        "precondition: the room counts from 1 again"
    );
    let first = next_ws(ws, &HashMap::new()).await;
    assert_eq!(first, ws_reset("room_restarted", 0, after[0].epoch));
    let read = read_ws(ws, &counts(&after)).await;
    assert_streams("after the flush", &read.events, &after);
    after
}

/// The WebSocket `reset` of X: its reason and where the reader now stands.
fn ws_reset(reason: &str, seq: u64, epoch: u32) -> Value {
    json!({"type": "reset", "room": X, "reason": reason, "seq": seq, "epoch": epoch})
}

/// Keys flushed before this process saw any live event of the room: A's reader joined
/// X when it held 5 events, so A's position there came from the head, and the new
/// numbering's 1, 2, 3 are below it with no live event to compare them with. By
/// numbers alone they were repeats and were dropped, silently; their epoch says they
/// are a new numbering.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_flushed_before_any_live_event_reset_readers_then_deliver() {
    let Some(redis) = upcoach_testing::PrivateRedis::start().await else {
        return;
    };
    let tokens = Arc::new(Tokens::default());
    let a = quick_process(&redis.url(), tokens.clone()).await;
    let before = publish(&a.hub, 5, "before", only_x).await;
    let mut ws = support::ws(a.addr, Some(&tokens.admin())).await;
    assert_eq!(support::subscribe(&mut ws, X, None).await, 5);

    let after = flush_then_read_the_restart(&redis.url(), &a.hub, &mut ws).await;
    assert_ne!(after[0].epoch, before[0].epoch, "precondition: a new epoch");
    assert_eq!(a.hub.stats().resets, 1);
}

/// A room numbered before epochs (a counter with no epoch beside it, as an older
/// version left it) that Redis then loses: its readers stand at a position without an
/// epoch, and the new numbering's events, below it and with an epoch, are a restart,
/// not repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_numbered_before_epochs_that_redis_loses_resets_its_readers() {
    let Some(redis) = upcoach_testing::PrivateRedis::start().await else {
        return;
    };
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SET")
        .arg(format!("rt:{{{X}}}:seq"))
        .arg(100)
        .query_async(&mut conn)
        .await
        .unwrap();
    let tokens = Arc::new(Tokens::default());
    let a = quick_process(&redis.url(), tokens.clone()).await;
    let mut ws = support::ws(a.addr, Some(&tokens.admin())).await;
    assert_eq!(support::subscribe(&mut ws, X, None).await, 100);

    flush_then_read_the_restart(&redis.url(), &a.hub, &mut ws).await;
}

/// Redis restarts empty while A is cut off from it, and B publishes more events than
/// the old numbering had before A is back. By numbers alone, A's repair took the new
/// numbering's 6, 7… for the continuation of the old 5 (and a cursor of the old 5
/// resumed with them): events silently lost and others passed off as the old
/// numbering's. By epochs: A's readers get `reset`, then every event of the new
/// numbering once, and a cursor of the old numbering resumes with `reset`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_numbering_that_passes_the_old_count_before_a_process_reconnects_resets_its_readers()
{
    let Some(mut redis) = upcoach_testing::PrivateRedis::start().await else {
        return;
    };
    let proxy = FaultProxy::start(upcoach_testing::service_addr(&redis.url())).await;
    let tokens = Arc::new(Tokens::default());
    let via_proxy = upcoach_testing::url_via(&redis.url(), proxy.addr());
    let a = quick_process(&via_proxy, tokens.clone()).await;
    let b = quick_process(&redis.url(), tokens.clone()).await;
    let token = tokens.admin();
    let auth = format!("Bearer {token}");
    let mut sse = x_reader(&a, &tokens).await;
    let mut ws = support::ws(a.addr, Some(&token)).await;
    assert_eq!(support::subscribe(&mut ws, X, None).await, 0);
    let before = publish(&b.hub, 5, "before", only_x).await;
    let read = read_sse(&mut sse, &counts(&before)).await;
    assert_streams("A's SSE before", &read.events, &before);
    let old_cursor = read.last_id;
    let read = read_ws(&mut ws, &counts(&before)).await;
    assert_streams("A's WebSocket before", &read.events, &before);

    proxy.cut();
    let hub = a.hub.clone();
    until("A sees the broker down", NEXT, move || {
        !hub.status().broker.connected
    })
    .await;
    redis.restart().await;
    let after = publish_through(&b.hub, 12, "after").await;
    assert_eq!(
        (after[0].seq, after.last().unwrap().seq),
        (1, 12),
        "precondition: the new numbering passes the old count while A is away"
    );
    proxy.restore();
    a.until_connected("A, after the restore").await;

    let (reset, events) = read_sse_after_reset(&mut sse, after.len()).await;
    assert_eq!(reset, json!({"room": X, "reason": "room_restarted"}));
    assert_streams("A's SSE after the restart", &events, &after);
    let first = next_ws(&mut ws, &HashMap::new()).await;
    assert_eq!(first, ws_reset("room_restarted", 0, after[0].epoch));
    let read = read_ws(&mut ws, &counts(&after)).await;
    assert_streams("A's WebSocket after the restart", &read.events, &after);

    // A reader of the old numbering coming back (its 5 is below the new head of 12).
    let mut resumed = support::sse(
        a.addr,
        "rooms=public:x",
        &[("authorization", &auth), ("last-event-id", &old_cursor)],
    )
    .await;
    assert_eq!(resumed.status, 200);
    resumed.next().await.expect("an opening record");
    let live = publish(&b.hub, 3, "live", only_x).await;
    let (reset, events) = read_sse_after_reset(&mut resumed, live.len()).await;
    assert_eq!(reset, json!({"room": X, "reason": "room_restarted"}));
    assert_streams("the resumed SSE", &events, &live);
    // And a WebSocket client resuming with `since` and `epoch` of the old numbering.
    let mut old = support::ws(a.addr, Some(&token)).await;
    support::send(
        &mut old,
        json!({"type": "subscribe", "room": X, "since": 5, "epoch": before[0].epoch}),
    )
    .await;
    let subscribed = next_ws(&mut old, &HashMap::new()).await;
    assert_eq!(subscribed["type"], "subscribed");
    let head = live.last().unwrap().position();
    assert_eq!(
        next_ws(&mut old, &HashMap::new()).await,
        ws_reset("room_restarted", head.seq, head.epoch)
    );
}
