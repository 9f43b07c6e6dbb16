//! [`PrivateRedis`]: a `redis-server` of one test's own, for outages that act on the
//! server itself (a restart that loses every key, `DEBUG SLEEP`, `CLIENT KILL`).
//!
//! The shared Redis of `REDIS_URL` is never stopped or frozen by a test: other tests
//! use it at the same time. A private server on a free loopback port can be.

use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A `redis-server` on `127.0.0.1:<free port>`, keeping nothing on disk, with `DEBUG`
/// enabled. Killed when dropped.
///
/// [`start`](Self::start) returns `None` (skip, with the reason printed) when
/// `redis-server` is not installed, unless `UPCOACH_REQUIRE_SERVICES=1`, which makes
/// that a failure (`.ci/run` installs it).
///
/// ```no_run
/// # async fn demo() {
/// use upcoach_testing::PrivateRedis;
///
/// let Some(mut redis) = PrivateRedis::start().await else { return };
/// let url = redis.url();
/// // ... connect a client to `url`, write keys ...
/// redis.restart().await; // the same port, every key gone
/// # }
/// ```
#[derive(Debug)]
pub struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub async fn start() -> Option<Self> {
        if std::process::Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            let required = std::env::var(crate::REQUIRE_SERVICES).is_ok_and(|v| v == "1");
            assert!(
                !required,
                "redis-server is not installed but {}=1",
                crate::REQUIRE_SERVICES
            );
            eprintln!("skipping: redis-server is not installed");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut redis = Self { port, child: None };
        redis.spawn().await;
        Some(redis)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping().await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private redis-server on port {} does not answer",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_secs(1),
            client.get_multiplexed_async_connection(),
        )
        .await
        else {
            return false;
        };
        matches!(
            tokio::time::timeout(
                Duration::from_secs(1),
                redis::cmd("PING").query_async::<String>(&mut conn),
            )
            .await,
            Ok(Ok(_))
        )
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Kills the server (`SIGKILL`: no goodbye to its clients) and starts a new one on
    /// the same port: every key is gone, as after a crash of a Redis without
    /// persistence.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }

    /// Kills the server and leaves it down (until [`restart`](Self::restart)).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// `DEBUG SLEEP seconds`: the server answers nobody for that long. Returns once it
    /// has begun (the command is sent on a connection of its own, which waits it out
    /// in the background).
    pub async fn freeze(&self, seconds: f64) {
        let url = self.url();
        let client = redis::Client::open(url).expect("the private URL parses");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("a connection to the private redis-server");
        tokio::spawn(async move {
            let _: redis::RedisResult<()> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(seconds)
                .query_async(&mut conn)
                .await;
        });
        // The command is on its way once the server stops answering.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.ping().await && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `CLIENT KILL TYPE normal` and `TYPE pubsub`: closes every client connection
    /// (commands and subscriptions); how many were closed.
    pub async fn kill_clients(&self) -> u64 {
        let client = redis::Client::open(self.url()).expect("the private URL parses");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("a connection to the private redis-server");
        let mut killed = 0;
        for kind in ["pubsub", "normal"] {
            let n: u64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg(kind)
                .arg("SKIPME")
                .arg("yes")
                .query_async(&mut conn)
                .await
                .expect("CLIENT KILL");
            killed += n;
        }
        killed
    }
}
