//! The rate limiters against their bare baselines, in the same run:
//!
//! - `memory_check_<case>` (`RateLimiter::check`, awaited) and `memory_check_now_<case>`
//!   (`RateLimiter::check_now` through `&dyn RateLimiter`, the path the rate-limit layer
//!   takes for an in-process limiter) beside a bare `governor` keyed limiter
//!   (`check_key` on its default DashMap store and quanta clock, with the same
//!   `rule\0subject` string keys, built beforehand) for one hot key that is always
//!   admitted, one hot key that is always refused, and 10,000 subjects in turn. Goal:
//!   ≥ 0.8× the bare limiter's throughput.
//! - `redis_check_<n>_tasks`: `RedisLimiter::check` beside the same EVALSHA (the
//!   limiter's script, keys and arguments) sent with bare `redis` on the same
//!   `RedisConnection`, at 1 and 64 concurrent tasks (goal: ≥ 0.9×: what the limiter
//!   adds to the round trip); and, for reference, beside an EVALSHA of `return 1`,
//!   which shows what the script's own work costs Redis.
//!
//! After each group's criterion measurements a paired pass prints the ratios to judge
//! by: 21 rounds, both sides once a round in alternating order, each round's ratio of
//! throughputs; the median and quartiles.
//!
//! Redis parts need `REDIS_URL` (skipped, said so, without it).
//!
//! Measured (2-core machine, paired medians, two runs): `check_now` 1.01× the bare
//! `check_key` on a hot key, 1.03-1.06× refused, 0.83-0.89× over 10,000 subjects and
//! 0.93-0.98× on two threads; the awaited `check` 0.88×, 0.90-0.92×, 0.80-0.82× and
//! 0.88-0.94×. Through Redis the check is 0.97-1.00× its script sent bare from one task
//! and 0.99-1.01× from 64; against `return 1`, 0.65-0.68× and 0.26×: the script's TIME,
//! MGET and SET cost Redis far more than an empty script (`redis-benchmark -c 64`: 87k/s
//! against 142k/s), and at 64 tasks Redis's time is the limit.
//!
//! `cargo bench --bench rate_limit`

mod common;

use common::{ready, runtime};
use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use upcoach_core::limit::{MemoryLimiter, Quota, RateLimiter, RedisLimiter};
use upcoach_core::redis::{RedisConnection, RedisOptions};

const ROUNDS: usize = 21;

/// The median and quartiles of `v`.
fn quartiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 4], v[v.len() / 2], v[v.len() * 3 / 4])
}

/// Runs `bare` and `ours` (each returns how long its batch of `ops` took) for
/// [`ROUNDS`] rounds in alternating order and prints both rates and the ratio ours/bare.
fn paired(
    name: &str,
    goal: Option<f64>,
    ops: u64,
    mut bare: impl FnMut() -> Duration,
    mut ours: impl FnMut() -> Duration,
) {
    bare();
    ours();
    let (mut bare_rates, mut our_rates) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let (b, o) = if round % 2 == 0 {
            let b = bare();
            (b, ours())
        } else {
            let o = ours();
            (bare(), o)
        };
        bare_rates.push(ops as f64 / b.as_secs_f64());
        our_rates.push(ops as f64 / o.as_secs_f64());
    }
    let ratios: Vec<f64> = our_rates
        .iter()
        .zip(&bare_rates)
        .map(|(o, b)| o / b)
        .collect();
    let (_, bare_rate, _) = quartiles(bare_rates);
    let (_, our_rate, _) = quartiles(our_rates);
    let (q1, ratio, q3) = quartiles(ratios);
    let per_second = |rate: f64| {
        if rate >= 1e6 {
            format!("{:.2}M/s", rate / 1e6)
        } else {
            format!("{:.1}k/s", rate / 1e3)
        }
    };
    let verdict = match goal {
        Some(goal) if ratio >= goal => format!("goal >= {goal}: met"),
        Some(goal) => format!("goal >= {goal}: NOT MET"),
        None => "for reference".to_owned(),
    };
    eprintln!(
        "{name} paired ({ROUNDS} rounds): bare {}, ours {}, ratio {ratio:.2} \
         (quartiles {q1:.2}-{q3:.2}; {verdict})",
        per_second(bare_rate),
        per_second(our_rate),
    );
}

/// Runs `work(first_index, ops)` on `threads` threads, `ops` split evenly; how long it
/// took.
fn on_threads(threads: usize, ops: u64, work: impl Fn(usize, usize) + Sync) -> Duration {
    let per_thread = (ops as usize).div_ceil(threads);
    let start = Instant::now();
    if threads == 1 {
        work(0, per_thread);
    } else {
        std::thread::scope(|scope| {
            for t in 0..threads {
                let work = &work;
                scope.spawn(move || work(t * 7_919, per_thread));
            }
        });
    }
    start.elapsed()
}

/// One in-memory case: the quota, and the subjects checked in turn.
struct MemoryCase {
    name: &'static str,
    quota: Quota,
    subjects: Vec<String>,
}

fn memory_check(c: &mut Criterion) {
    const RULE: &str = "auth.refresh";
    // One request per nanosecond: every check is admitted.
    let open = Quota::new(1_000_000_000, Duration::from_secs(1)).unwrap();
    let cases = [
        MemoryCase {
            name: "admitted",
            quota: open,
            subjects: vec!["ip:203.0.113.7".into()],
        },
        MemoryCase {
            name: "refused",
            quota: Quota::new(10, Duration::from_secs(3600)).unwrap(),
            subjects: vec!["ip:203.0.113.7".into()],
        },
        MemoryCase {
            name: "10k_subjects",
            quota: open,
            subjects: (0..10_000u32)
                .map(|i| format!("ip:10.0.{}.{}", i / 256, i % 256))
                .collect(),
        },
    ];
    for case in cases {
        let quota = case.quota;
        let gcra = governor::Quota::with_period(quota.emission_interval())
            .unwrap()
            .allow_burst(NonZeroU32::new(quota.limit()).unwrap());
        let bare = governor::RateLimiter::keyed(gcra);
        let keys: Vec<String> = case
            .subjects
            .iter()
            .map(|s| format!("{RULE}\0{s}"))
            .collect();
        let limiter = MemoryLimiter::new();
        // Spend the "refused" budget (and make every key) before measuring.
        for _ in 0..20 {
            for (key, subject) in keys.iter().zip(&case.subjects) {
                let _ = bare.check_key(key);
                ready(limiter.check(RULE, subject, quota)).unwrap();
            }
        }
        let n = keys.len();
        // `ops` checks split over `threads` threads, each starting at its own subject.
        let bare_on = |threads: usize, ops: u64| {
            on_threads(threads, ops, |from, ops| {
                for i in from..from + ops {
                    let _ = black_box(bare.check_key(&keys[i % n]));
                }
            })
        };
        let ours_on = |threads: usize, ops: u64| {
            on_threads(threads, ops, |from, ops| {
                for i in from..from + ops {
                    black_box(ready(limiter.check(RULE, &case.subjects[i % n], quota)).unwrap());
                }
            })
        };
        // The same through the trait's `check_now`, as the rate-limit layer calls it.
        let seam: &dyn RateLimiter = &limiter;
        let now_on = |threads: usize, ops: u64| {
            on_threads(threads, ops, |from, ops| {
                for i in from..from + ops {
                    let decided = seam.check_now(RULE, &case.subjects[i % n], quota);
                    black_box(decided.expect("in memory").unwrap());
                }
            })
        };
        let bare_batch = |ops: u64| bare_on(1, ops);
        let our_batch = |ops: u64| ours_on(1, ops);
        let now_batch = |ops: u64| now_on(1, ops);

        let mut group = c.benchmark_group(format!("memory_check_{}", case.name));
        group.throughput(Throughput::Elements(1));
        group.bench_function("bare_governor_check_key", |b| b.iter_custom(bare_batch));
        group.bench_function("memory_limiter_check", |b| b.iter_custom(our_batch));
        group.bench_function("memory_limiter_check_now", |b| b.iter_custom(now_batch));
        group.finish();
        paired(
            &format!("memory_check_now_{}", case.name),
            Some(0.8),
            200_000,
            || bare_batch(200_000),
            || now_batch(200_000),
        );
        paired(
            &format!("memory_check_{}", case.name),
            Some(0.8),
            200_000,
            || bare_batch(200_000),
            || our_batch(200_000),
        );
        if case.name == "10k_subjects" {
            paired(
                "memory_check_10k_subjects_2_threads",
                Some(0.8),
                400_000,
                || bare_on(2, 400_000),
                || ours_on(2, 400_000),
            );
            paired(
                "memory_check_now_10k_subjects_2_threads",
                Some(0.8),
                400_000,
                || bare_on(2, 400_000),
                || now_on(2, 400_000),
            );
        }
        let stats = limiter.stats();
        assert_eq!(
            stats.refused_full, 0,
            "no key was refused for room: {stats:?}"
        );
    }
}

/// What a `redis_check` measurement runs.
#[derive(Clone, Copy)]
enum RedisCall {
    /// EVALSHA of `return 1`: a script round trip and nothing else.
    BareEvalsha,
    /// EVALSHA of the limiter's script with the limiter's keys and arguments.
    BareGcraScript,
    /// `RedisLimiter::check`.
    Check,
}

#[derive(Clone)]
struct RedisSetup {
    conn: RedisConnection,
    trivial: Arc<redis::Script>,
    limiter: Arc<RedisLimiter>,
    quota: Quota,
}

/// `tasks` tasks each making `per_task` calls; how long it took.
async fn redis_calls(setup: &RedisSetup, call: RedisCall, tasks: usize, per_task: u64) -> Duration {
    let start = Instant::now();
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let setup = setup.clone();
        handles.push(tokio::spawn(async move {
            let subject = format!("user:{task}");
            let mut conn = setup.conn.clone();
            for _ in 0..per_task {
                match call {
                    RedisCall::BareEvalsha => {
                        let one: i64 = setup.trivial.invoke_async(&mut conn).await.unwrap();
                        black_box(one);
                    }
                    RedisCall::BareGcraScript => {
                        let reply: Vec<i64> = setup
                            .limiter
                            .check_script()
                            .key(setup.limiter.rule_key("api", &subject))
                            .key(setup.limiter.block_key(&subject))
                            .arg(setup.quota.emission_interval().as_micros() as u64)
                            .arg(setup.quota.limit())
                            .invoke_async(&mut conn)
                            .await
                            .unwrap();
                        black_box(reply);
                    }
                    RedisCall::Check => {
                        let d = setup
                            .limiter
                            .check("api", &subject, setup.quota)
                            .await
                            .unwrap();
                        assert!(d.allowed);
                        black_box(d);
                    }
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed()
}

fn redis_check(c: &mut Criterion) {
    let Some(url) = std::env::var("REDIS_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!("skipping redis_check: REDIS_URL is not set");
        return;
    };
    let rt = runtime();
    let client = redis::Client::open(url.as_str()).unwrap();
    // Generous timeouts: a stall of this shared machine must not abort the run.
    let options = RedisOptions {
        response_timeout: Duration::from_secs(10),
        ..RedisOptions::default()
    };
    let conn = rt
        .block_on(RedisConnection::from_client(client, options, "bench"))
        .unwrap();
    let setup = RedisSetup {
        limiter: Arc::new(
            RedisLimiter::new(conn.clone(), format!("bench:{}:limit", std::process::id()))
                .with_timeout(Duration::from_secs(10)),
        ),
        conn,
        trivial: Arc::new(redis::Script::new("return 1")),
        // A million a second: every check is admitted, and each key expires at once.
        quota: Quota::new(1_000_000, Duration::from_secs(1)).unwrap(),
    };
    for tasks in [1usize, 64] {
        let mut group = c.benchmark_group(format!("redis_check_{tasks}_tasks"));
        group.throughput(Throughput::Elements(1));
        group.sample_size(20);
        for (name, call) in [
            ("bare_evalsha_return_1", RedisCall::BareEvalsha),
            ("bare_evalsha_gcra_script", RedisCall::BareGcraScript),
            ("redis_limiter_check", RedisCall::Check),
        ] {
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let per_task = iters.div_ceil(tasks as u64);
                    let took = rt.block_on(redis_calls(&setup, call, tasks, per_task));
                    took.mul_f64(iters as f64 / (per_task * tasks as u64) as f64)
                })
            });
        }
        group.finish();
        // About 0.1 s a side a round.
        let per_task = match tasks {
            1 => 2_000,
            t => 40_000 / t as u64,
        };
        let run = |call| rt.block_on(redis_calls(&setup, call, tasks, per_task));
        paired(
            &format!("redis_check_{tasks}_tasks vs return 1"),
            None,
            per_task * tasks as u64,
            || run(RedisCall::BareEvalsha),
            || run(RedisCall::Check),
        );
        paired(
            &format!("redis_check_{tasks}_tasks vs its script bare"),
            Some(0.9),
            per_task * tasks as u64,
            || run(RedisCall::BareGcraScript),
            || run(RedisCall::Check),
        );
    }
}

criterion_group!(benches, memory_check, redis_check);
criterion_main!(benches);
