//! [`PrivateRedis`]: a `redis-server` of one test's own, for outages that act on the
//! server itself (a restart that loses every key, `DEBUG SLEEP`, `CLIENT KILL`).
//!
//! The shared Redis of `REDIS_URL` is never stopped or frozen by a test: other tests
//! use it at the same time. A private server on a free loopback port can be.

use std::net::{SocketAddr, TcpListener};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A loopback port nothing listens on at the moment.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

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
    /// Starts a server on a free port and waits until it answers as itself.
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
        // A port found free may be taken before the server binds it: then it exits,
        // and another port is tried.
        for _ in 0..5 {
            let mut redis = Self {
                port: free_port(),
                child: None,
            };
            if redis.spawn().await {
                return Some(redis);
            }
        }
        panic!("no private redis-server could be started on a free port");
    }

    /// Starts the server on this port; whether it answers as the process started
    /// (its `process_id`), not some other server on the port.
    async fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server");
        let pid = child.id();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if pid.is_some() && self.process_id().await == pid {
                self.child = Some(child);
                return true;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private redis-server on port {} does not answer",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A connection, if the server answers within `within`.
    async fn connection(&self, within: Duration) -> Option<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url()).ok()?;
        tokio::time::timeout(within, client.get_multiplexed_async_connection())
            .await
            .ok()?
            .ok()
    }

    /// The `process_id` the server on the port reports, if one answers.
    async fn process_id(&self) -> Option<u32> {
        let within = Duration::from_millis(500);
        let mut conn = self.connection(within).await?;
        let info: String = tokio::time::timeout(
            within,
            redis::cmd("INFO").arg("server").query_async(&mut conn),
        )
        .await
        .ok()?
        .ok()?;
        info.lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .and_then(|pid| pid.trim().parse().ok())
    }

    /// Whether the server answers `PING` within `within`.
    async fn answers(&self, within: Duration) -> bool {
        let Some(mut conn) = self.connection(within).await else {
            return false;
        };
        matches!(
            tokio::time::timeout(within, redis::cmd("PING").query_async::<String>(&mut conn)).await,
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
        assert!(
            self.spawn().await,
            "the private redis-server could not start again on port {}",
            self.port
        );
    }

    /// Kills the server and leaves it down (until [`restart`](Self::restart)).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// `DEBUG SLEEP seconds`: the server answers nobody for that long. Returns once it
    /// has stopped answering (checked), with the moment the command was sent; the
    /// command's own connection waits the sleep out in the background.
    pub async fn freeze(&self, seconds: f64) -> tokio::time::Instant {
        let mut conn = self
            .connection(Duration::from_secs(2))
            .await
            .expect("a connection to the private redis-server");
        let sent = tokio::time::Instant::now();
        tokio::spawn(async move {
            let _: redis::RedisResult<()> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg(seconds)
                .query_async(&mut conn)
                .await;
        });
        let deadline = sent + Duration::from_secs(2);
        while self.answers(Duration::from_millis(50)).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the private redis-server still answers after DEBUG SLEEP"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        sent
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
