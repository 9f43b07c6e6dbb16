//! nginx in front of servers under test or bench, configured from the project's
//! template `deploy/nginx/upcoach.conf.in` (round robin, WebSocket and SSE proxied,
//! `X-Forwarded-For` sent from `proxy_bind`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running nginx on a free loopback port. Dropping it stops it with SIGTERM (then
/// SIGKILL after 5 s): its workers outlive a SIGKILLed master.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Nginx {
    /// Debian's nginx, if installed.
    pub fn binary() -> Option<PathBuf> {
        ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
    }

    /// nginx round robin over `upstreams`, connecting to them from `proxy_bind`, with
    /// the template rendered and then passed through `edit` (a bench sizes it up).
    ///
    /// # Errors
    ///
    /// nginx missing, the template unreadable, or nginx not listening within 5 s.
    pub async fn start(
        upstreams: &[SocketAddr],
        proxy_bind: &str,
        edit: impl FnOnce(String) -> String,
    ) -> std::io::Result<Self> {
        let binary = Self::binary().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "nginx is missing (apt-get install nginx-light)",
            )
        })?;
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let dir = std::env::temp_dir().join(format!("upcoach-nginx-{}", addr.port()));
        std::fs::create_dir_all(&dir)?;
        let template = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/nginx/upcoach.conf.in"
        );
        let servers: Vec<String> = upstreams
            .iter()
            .map(|a| format!("        server {a} max_fails=1 fail_timeout=2s;"))
            .collect();
        let config = std::fs::read_to_string(template)?
            .replace("@LISTEN@", &addr.to_string())
            .replace("@SERVERS@", &servers.join("\n"))
            .replace("@PROXY_BIND@", proxy_bind)
            .replace("@RUN_DIR@", &dir.display().to_string());
        let path = dir.join("nginx.conf");
        std::fs::write(&path, edit(config))?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("error.log"))
            // As root, nginx's workers would run as `nobody`; here they stay ours.
            .args(["-g", "daemon off; user root;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let nginx = Nginx { child, addr, dir };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(nginx);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(std::io::Error::other(format!(
            "nginx did not listen on {addr}: {}",
            nginx.error_log()
        )))
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its error log so far, for a failure's message.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }

    /// CPU seconds of the master and its workers (from `/proc`; 0 elsewhere).
    pub fn cpu_seconds(&self) -> f64 {
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
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
