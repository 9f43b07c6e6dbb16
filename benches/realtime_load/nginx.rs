//! nginx in front of our servers for the `ours+nginx` fan-out run: the configuration of
//! `deploy/nginx/upcoach.conf.in`, sized for 10,000 proxied WebSockets (two workers,
//! `reuseport`, each worker's open-file limit raised, no access log, and no cap per
//! client address: each client process holds thousands of the connections).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::driver::Res;

/// A running nginx, stopped with SIGTERM (its workers outlive a SIGKILLed master),
/// also when dropped on an error.
pub(crate) struct Nginx {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            terminate(&mut self.child);
        }
    }
}

impl Nginx {
    /// Debian's nginx, if installed.
    pub(crate) fn binary() -> Option<PathBuf> {
        ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
    }

    /// nginx on a free loopback port, round robin over `upstreams`.
    pub(crate) async fn start(upstreams: &[SocketAddr]) -> Res<Self> {
        let binary = Self::binary().ok_or("nginx is missing (apt-get install nginx-light)")?;
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let dir = std::env::temp_dir().join(format!("upcoach-bench-nginx-{}", addr.port()));
        std::fs::create_dir_all(&dir)?;
        let template = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx/upcoach.conf.in");
        let servers: Vec<String> = upstreams
            .iter()
            .map(|a| format!("        server {a} max_fails=1 fail_timeout=2s;"))
            .collect();
        let config = std::fs::read_to_string(template)?
            .replace("worker_processes 1;", "worker_processes 2;")
            .replace("worker_rlimit_nofile 16384;", "worker_rlimit_nofile 19500;")
            .replace("worker_connections 8192;", "worker_connections 19000;")
            .replace("limit_conn per_client 256;", "")
            .replace("access_log @RUN_DIR@/access.log;", "access_log off;")
            .replace("listen @LISTEN@;", "listen @LISTEN@ reuseport;")
            .replace("@LISTEN@", &addr.to_string())
            .replace("@SERVERS@", &servers.join("\n"))
            .replace("@PROXY_BIND@", "127.0.0.2")
            .replace("@RUN_DIR@", &dir.display().to_string());
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config)?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("error.log"))
            .args(["-g", "daemon off; user root;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let nginx = Nginx { child, addr };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(nginx);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        nginx.stop();
        Err(format!("nginx did not listen on {addr}; see {}", dir.display()).into())
    }

    /// CPU seconds of the master and its workers.
    pub(crate) fn cpu_seconds(&self) -> f64 {
        let pid = self.child.id().to_string();
        let mut ticks = 0u64;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            let Some((head, fields)) = stat.rsplit_once(')') else {
                continue;
            };
            let fields: Vec<&str> = fields.split_whitespace().collect();
            // Field 4 is the parent; 14 and 15 the user and system time.
            let own = head.split_whitespace().next() == Some(pid.as_str());
            if own || fields.get(1) == Some(&pid.as_str()) {
                ticks += [11, 12]
                    .iter()
                    .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
        ticks as f64 / 100.0
    }

    pub(crate) fn stop(self) {
        drop(self);
    }
}

/// SIGTERM, then SIGKILL after 5 s.
fn terminate(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..200 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
}
