//! `RedisConnection` on a Redis Cluster (`REDIS_CLUSTER_URL`, as
//! `deploy/redis-cluster.sh start` prints): routing by key, pipelines that span slots,
//! scripts, pub/sub across nodes, and clear refusals of malformed cluster URLs.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use redis::cluster_routing::Slot;
use upcoach_core::config::ServiceUrl;
use upcoach_core::redis::{PubSubSource, RedisConnection, RedisOptions, RedisState};
use upcoach_testing::RedisPrefix;

const SCHEMES: &[&str] = &["redis", "redis+cluster"];

async fn cluster(prefix: &RedisPrefix) -> RedisConnection {
    let url = ServiceUrl::parse(prefix.url(), SCHEMES).unwrap();
    RedisConnection::connect(&url, RedisOptions::default())
        .await
        .unwrap()
}

/// The port of the node that holds `slot`, from `CLUSTER SLOTS`.
async fn owner(conn: &RedisConnection, slot: u16) -> u16 {
    let slots: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let number = |v: &redis::Value| match v {
        redis::Value::Int(n) => *n,
        other => panic!("CLUSTER SLOTS gave {other:?}"),
    };
    for range in slots {
        let (from, to) = (number(&range[0]), number(&range[1]));
        if (from..=to).contains(&i64::from(slot)) {
            let redis::Value::Array(node) = &range[2] else {
                panic!("CLUSTER SLOTS gave {range:?}")
            };
            return number(&node[1]) as u16;
        }
    }
    panic!("no node holds slot {slot}")
}

/// Keys under `prefix` whose slots fall on `n` different nodes.
async fn keys_on_different_nodes(
    conn: &RedisConnection,
    prefix: &RedisPrefix,
    n: usize,
) -> Vec<String> {
    let mut keys = Vec::new();
    let mut nodes = HashSet::new();
    for i in 0..1_000 {
        let key = prefix.key(&format!("k{i}"));
        let node = owner(conn, slot_of(&key)).await;
        if nodes.insert(node) {
            keys.push(key);
            if keys.len() == n {
                return keys;
            }
        }
    }
    panic!("the cluster has fewer than {n} primaries");
}

/// The cluster's seed nodes, as the prefix's URL lists them.
fn seeds(prefix: &RedisPrefix) -> Vec<ServiceUrl> {
    ServiceUrl::parse(prefix.url(), SCHEMES)
        .unwrap()
        .cluster_seeds()
        .unwrap()
}

/// Subscribers of `channel` on the one node `node` names (`PUBSUB NUMSUB` counts that
/// node's own).
async fn subscribers(node: &ServiceUrl, channel: &str) -> i64 {
    let mut conn = redis::Client::open(node.expose())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    count
}

fn slot_of(key: &str) -> u16 {
    // Slot has no accessor for its number; its Debug form is `Slot(n)`.
    let text = format!("{:?}", Slot::for_key(key));
    text.trim_start_matches("Slot(")
        .trim_end_matches(')')
        .parse()
        .unwrap()
}

#[tokio::test]
async fn commands_reach_the_node_that_owns_each_key() {
    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    let conn = cluster(&prefix).await;
    assert!(conn.is_cluster());
    let keys = keys_on_different_nodes(&conn, &prefix, 3).await;
    for (i, key) in keys.iter().enumerate() {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(i)
            .query_async(&mut conn.clone())
            .await
            .unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        let got: usize = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn.clone())
            .await
            .unwrap();
        assert_eq!(got, i);
    }
    // MGET across three nodes: split by the cluster client, answered in order.
    let all: Vec<usize> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert_eq!(all, vec![0, 1, 2]);
    conn.ping().await.unwrap();
    assert_eq!(conn.state(), RedisState::Connected);
}

#[tokio::test]
async fn a_pipeline_across_slots_is_split_and_answered_in_order() {
    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    let conn = cluster(&prefix).await;
    let keys = keys_on_different_nodes(&conn, &prefix, 3).await;
    let mut pipe = redis::pipe();
    for (i, key) in keys.iter().enumerate() {
        // Order within one key holds: the INCR sees the SET before it.
        pipe.cmd("SET").arg(key).arg(i * 10).ignore();
        pipe.cmd("INCR").arg(key);
        pipe.cmd("PEXPIRE").arg(key).arg(60_000).ignore();
    }
    pipe.cmd("GET").arg(&keys[0]);
    let answers: Vec<i64> = pipe.query_async(&mut conn.clone()).await.unwrap();
    assert_eq!(answers, vec![1, 11, 21, 1]);

    // A transaction cannot be split: the cluster refuses it.
    let mut tx = redis::pipe();
    tx.atomic();
    for key in &keys {
        tx.cmd("SET").arg(key).arg("x").ignore();
    }
    let refused: redis::RedisResult<()> = tx.query_async(&mut conn.clone()).await;
    assert!(refused.is_err(), "a transaction across slots must fail");
    let untouched: i64 = redis::cmd("GET")
        .arg(&keys[1])
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert_eq!(untouched, 11, "nothing of the refused transaction ran");
}

/// Scripts, multi-key and subcommand commands in a pipeline across slots: each goes on
/// its own, routed by its real keys (a script's first argument is the script, not a
/// key; `OBJECT`'s is a subcommand).
#[tokio::test]
async fn a_split_pipeline_routes_scripts_and_multi_key_commands_by_their_keys() {
    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    let conn = cluster(&prefix).await;
    let keys = keys_on_different_nodes(&conn, &prefix, 3).await;
    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    // Loaded on every primary first, so EVALSHA answers rather than NOSCRIPT.
    let _: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let mut pipe = redis::pipe();
    pipe.cmd("INCR").arg(&keys[0]);
    pipe.cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(1)
        .arg(&keys[1])
        .arg(5);
    pipe.cmd("EVALSHA")
        .arg(script.get_hash())
        .arg(1)
        .arg(&keys[2])
        .arg(7);
    pipe.cmd("EVAL")
        .arg("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        .arg(1)
        .arg(&keys[2])
        .arg(1);
    pipe.cmd("MGET").arg(&keys);
    pipe.cmd("OBJECT").arg("ENCODING").arg(&keys[1]);
    pipe.cmd("EXISTS").arg(&keys);
    let (a, b, c, c2, all, encoding, exists): (i64, i64, i64, i64, Vec<i64>, String, i64) =
        pipe.query_async(&mut conn.clone()).await.unwrap();
    assert_eq!((a, b, c, c2), (1, 5, 7, 8));
    assert_eq!(encoding, "int");
    // A script or multi-key command waits for everything before it.
    assert_eq!(all, vec![1, 5, 8]);
    assert_eq!(exists, 3);

    // A multi-key command in a pipeline whose single-key commands share a slot: the
    // cluster client would send it whole and meet CROSSSLOT; it is split instead.
    let mut pipe = redis::pipe();
    pipe.cmd("INCR").arg(&keys[0]);
    pipe.cmd("MGET").arg(&keys);
    pipe.cmd("DEL").arg(&keys[2]);
    pipe.cmd("EXISTS").arg(&keys);
    let (a, all, deleted, exists): (i64, Vec<i64>, i64, i64) =
        pipe.query_async(&mut conn.clone()).await.unwrap();
    assert_eq!((a, all, deleted, exists), (2, vec![2, 5, 8], 1, 2));
}

/// A part that fails fails the pipeline, whatever the other parts did.
#[tokio::test]
async fn a_failed_part_fails_the_split_pipeline() {
    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    let conn = cluster(&prefix).await;
    let keys = keys_on_different_nodes(&conn, &prefix, 2).await;
    let _: () = redis::cmd("SET")
        .arg(&keys[1])
        .arg("not a number")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    let mut pipe = redis::pipe();
    pipe.cmd("INCR").arg(&keys[0]);
    pipe.cmd("INCR").arg(&keys[1]);
    let refused: redis::RedisResult<(i64, i64)> = pipe.query_async(&mut conn.clone()).await;
    assert!(refused.is_err(), "{refused:?}");
    let ran: i64 = redis::cmd("GET")
        .arg(&keys[0])
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert_eq!(
        ran, 1,
        "the other part ran: a failed split pipeline is not all-or-nothing"
    );
}

#[tokio::test]
async fn scripts_run_on_the_node_of_their_hash_tagged_keys() {
    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    let conn = cluster(&prefix).await;
    let script = redis::Script::new(
        "redis.call('SET', KEYS[1], ARGV[1]); redis.call('SET', KEYS[2], ARGV[1]); return redis.call('MGET', KEYS[1], KEYS[2])",
    );
    // Several tags, so the script is loaded (after NOSCRIPT) on more than one node.
    for tag in ["a", "b", "c", "d", "e", "f"] {
        let one = prefix.key(&format!("{{{tag}}}:one"));
        let two = prefix.key(&format!("{{{tag}}}:two"));
        let got: Vec<String> = script
            .key(&one)
            .key(&two)
            .arg(tag)
            .invoke_async(&mut conn.clone())
            .await
            .unwrap();
        assert_eq!(got, vec![tag, tag]);
    }
    // Without a shared tag, the cluster says so rather than running half a script.
    let refused: redis::RedisResult<Vec<String>> = script
        .key(prefix.key("x1"))
        .key(prefix.key("x2"))
        .arg("v")
        .invoke_async(&mut conn.clone())
        .await;
    let slots_differ = slot_of(&prefix.key("x1")) != slot_of(&prefix.key("x2"));
    assert_eq!(refused.is_err(), slots_differ);
}

#[tokio::test]
async fn a_publish_reaches_subscribers_on_every_node() {
    if let Some(prefix) = RedisPrefix::on_cluster() {
        let url = ServiceUrl::parse(prefix.url(), SCHEMES).unwrap();
        reaches_every_node(&prefix, url).await;
    }
}

/// With one seed in the URL, the source finds the other nodes from the cluster itself.
#[tokio::test]
async fn from_one_seed_subscriptions_still_spread_over_every_node() {
    if let Some(prefix) = RedisPrefix::on_cluster() {
        let url = ServiceUrl::parse(prefix.url(), SCHEMES).unwrap();
        let seed = url.cluster_seeds().unwrap()[0].url().clone();
        let one = format!(
            "redis+cluster://{}:{}",
            seed.host_str().unwrap(),
            seed.port().unwrap()
        );
        reaches_every_node(&prefix, ServiceUrl::parse(&one, SCHEMES).unwrap()).await;
    }
}

async fn reaches_every_node(prefix: &RedisPrefix, url: ServiceUrl) {
    let conn = RedisConnection::connect(&url, RedisOptions::default())
        .await
        .unwrap();
    let source = conn
        .pubsub()
        .expect("a cluster connection has a pub/sub source")
        .clone();
    let channel = prefix.key("news");
    // Three subscriptions, one per seed node (the source moves on each time).
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut pubsub = source.open().await.unwrap();
        pubsub.subscribe(&channel).await.unwrap();
        streams.push(pubsub.into_on_message());
    }
    // One subscriber on each node: the source moved on after each open.
    for seed in seeds(prefix) {
        assert_eq!(
            subscribers(&seed, &channel).await,
            1,
            "subscribers on {seed}"
        );
    }
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg("hello")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert!(
        receivers >= 1,
        "the node that took the PUBLISH has a subscriber"
    );
    for stream in &mut streams {
        let message = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("every node's subscriber hears the publish")
            .unwrap();
        assert_eq!(message.get_payload::<String>().unwrap(), "hello");
    }
}

#[tokio::test]
async fn a_pubsub_source_skips_a_node_that_is_down() {
    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    let seeds = seeds(&prefix);
    // A closed port first, then the real seeds.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("redis://{}/", closed.local_addr().unwrap());
    drop(closed);
    let mut nodes = vec![redis::Client::open(dead).unwrap()];
    nodes.extend(
        seeds
            .iter()
            .map(|s| redis::Client::open(s.expose()).unwrap()),
    );
    let source = PubSubSource::from_nodes(nodes).unwrap();
    for _ in 0..4 {
        let mut pubsub = tokio::time::timeout(Duration::from_secs(5), source.open())
            .await
            .unwrap()
            .unwrap();
        pubsub.subscribe(prefix.key("x")).await.unwrap();
    }
    assert!(PubSubSource::from_nodes(Vec::new()).is_err());
}

#[test]
fn malformed_cluster_urls_are_refused_with_a_reason() {
    let cases = [
        ("redis+cluster://a:7000,b:7000", "commas"),
        ("REDIS+CLUSTER://u:p@a:7000,b:7000", "commas"),
        ("redis+cluster://a:7000/3", "database 0"),
        ("redis+cluster://a:7000?addr=b", "host:port"),
        ("redis+cluster://a:7000?addr=b:x", "host:port"),
        ("redis+cluster://a:7000?addr=b:0", "host:port"),
        ("redis+cluster://a:0", "port"),
        ("redis+cluster://a:7000?addr=u:hunter2@b:7001", "host:port"),
        ("redis+cluster://a:7000?addr=b:7001/2", "host:port"),
        ("redis+cluster://a:7000?timeout=3", "only addr"),
    ];
    for (url, why) in cases {
        let err = ServiceUrl::parse(url, SCHEMES).unwrap_err();
        assert!(err.contains(why), "{url}: {err}");
    }
    let url = ServiceUrl::parse("redis+cluster://u:pw@a:7000?addr=b:7001", SCHEMES).unwrap();
    assert!(!url.to_string().contains("pw"), "{url}");
    let seeds = url.cluster_seeds().unwrap();
    assert_eq!(seeds.len(), 2);
    assert_eq!(seeds[1].expose(), "redis://u:pw@b:7001/");
    // A comma in the password is no host list; IPv6 seeds keep their brackets.
    let url = ServiceUrl::parse(
        "redis+cluster://u:p%2Cw@[::1]:7000?addr=[::1]:7001",
        SCHEMES,
    )
    .unwrap();
    let seeds = url.cluster_seeds().unwrap();
    assert_eq!(seeds[0].expose(), "redis://u:p%2Cw@[::1]:7000/");
    assert_eq!(seeds[1].expose(), "redis://u:p%2Cw@[::1]:7001/");
    let url = ServiceUrl::parse("redis+cluster://u:p,w@a:7000", SCHEMES).unwrap();
    assert_eq!(
        url.cluster_seeds().unwrap()[0].expose(),
        "redis://u:p,w@a:7000/"
    );
}

#[tokio::test]
async fn connecting_to_a_cluster_that_is_not_there_fails_clearly() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let url = ServiceUrl::parse(&format!("redis+cluster://:pw@127.0.0.1:{port}"), SCHEMES).unwrap();
    let options = RedisOptions {
        connection_timeout: Duration::from_millis(200),
        response_timeout: Duration::from_millis(200),
        reconnect_retries: 1,
    };
    let err = tokio::time::timeout(
        Duration::from_secs(10),
        RedisConnection::connect(&url, options),
    )
    .await
    .expect("gives up in time")
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    let mut chain = format!("{err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        chain.push_str(&cause.to_string());
        source = cause.source();
    }
    assert!(!chain.contains("pw"), "no password in errors: {chain}");
}

#[tokio::test]
async fn a_prefix_on_the_cluster_leaves_no_key_behind() {
    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    let conn = cluster(&prefix).await;
    let keys = keys_on_different_nodes(&conn, &prefix, 3).await;
    for key in &keys {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(1)
            .query_async(&mut conn.clone())
            .await
            .unwrap();
    }
    drop(prefix);
    let left: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&keys)
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert!(left.iter().all(Option::is_none), "{left:?}");
}

/// A process's subscription node goes away: the broadcaster subscribes on the next seed
/// and its subscribers get every event, in order, with no gap (the missed ones from
/// the room's history).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_its_subscription_node_is_cut_a_broadcaster_moves_to_the_next_without_a_gap() {
    use std::sync::Arc;
    use upcoach_realtime::{Broadcaster, RedisBroadcaster, RedisBroadcasterOptions};
    use upcoach_testing::FaultProxy;

    let Some(prefix) = RedisPrefix::on_cluster() else {
        return;
    };
    let seeds = seeds(&prefix);
    // The first node this process subscribes on is reached through a proxy.
    let proxy = FaultProxy::start(upcoach_testing::service_addr(seeds[0].expose())).await;
    let mut nodes = vec![
        redis::Client::open(upcoach_testing::url_via(seeds[0].expose(), proxy.addr())).unwrap(),
    ];
    nodes.extend(
        seeds[1..]
            .iter()
            .map(|s| redis::Client::open(s.expose()).unwrap()),
    );
    let options = || RedisBroadcasterOptions {
        prefix: prefix.key("rt"),
        timeout: Duration::from_millis(500),
        ping_interval: Duration::from_millis(200),
        ..RedisBroadcasterOptions::default()
    };
    let listener = RedisBroadcaster::new(
        PubSubSource::from_nodes(nodes).unwrap(),
        cluster(&prefix).await,
        options(),
    );
    let publisher: Arc<dyn Broadcaster> = Arc::new(
        RedisBroadcaster::connect(prefix.url(), options())
            .await
            .unwrap(),
    );
    let mut sub = listener.subscribe("public:x").await.unwrap();
    for _ in 0..100 {
        if listener.state().connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(listener.state().connected);

    let mut seqs = Vec::new();
    for i in 0..30u64 {
        if i == 10 {
            proxy.cut();
        }
        publisher
            .publish("public:x", "tick", serde_json::json!({ "i": i }))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while seqs.len() < 30 {
        let event = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .unwrap_or_else(|_| panic!("stalled after {seqs:?}"))
            .unwrap();
        seqs.push(event.seq);
    }
    assert_eq!(seqs, (1..=30).collect::<Vec<u64>>());
    // The listener's subscription now sits on another node (the proxy stayed cut).
    let channel = format!("{}:ch:public:x", prefix.key("rt"));
    let mut elsewhere = 0;
    for seed in &seeds[1..] {
        elsewhere += subscribers(seed, &channel).await;
    }
    assert_eq!(
        elsewhere, 1,
        "one subscription, on a node other than the cut one"
    );
}
