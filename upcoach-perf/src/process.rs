//! Process resource readings from `/proc` (Linux): memory, CPU, threads, descriptors.

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`, fixed at 100 on Linux).
const USER_HZ: f64 = 100.0;

/// One reading of the process; a field is `None` where the platform does not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProcessReading {
    /// Resident set size.
    pub rss_bytes: Option<u64>,
    /// The memory the process may use: the cgroup limit if one is set, else the
    /// machine's total.
    pub memory_limit_bytes: Option<u64>,
    /// CPU time used since start (user + system).
    pub cpu_seconds: Option<f64>,
    /// CPU use since the previous reading, in percent of one core.
    pub cpu_percent: Option<f64>,
    /// Threads.
    pub threads: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The open-files limit.
    pub max_fds: Option<u64>,
}

impl ProcessReading {
    /// `rss_bytes / memory_limit_bytes`, when both are known.
    pub fn memory_used_ratio(&self) -> Option<f64> {
        match (self.rss_bytes, self.memory_limit_bytes) {
            (Some(rss), Some(limit)) if limit > 0 => Some(rss as f64 / limit as f64),
            _ => None,
        }
    }
}

/// Takes [`ProcessReading`]s; remembers the last CPU time to give a percentage.
#[derive(Debug, Default)]
pub struct ProcessSampler {
    last_cpu: Mutex<Option<(Instant, f64)>>,
}

impl ProcessSampler {
    /// A sampler with no previous reading.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the process now.
    pub fn sample(&self) -> ProcessReading {
        let status = std::fs::read_to_string("/proc/self/status").ok();
        let field = |name: &str| -> Option<u64> {
            status
                .as_deref()?
                .lines()
                .find_map(|l| l.strip_prefix(name))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        let rss_bytes = field("VmRSS:").map(|kb| kb * 1024);
        let threads = field("Threads:");
        let cpu_seconds = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| {
                // Fields after the command name, which is in parentheses and may hold spaces.
                let rest = &stat[stat.rfind(')')? + 2..];
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let utime: f64 = fields.get(11)?.parse().ok()?;
                let stime: f64 = fields.get(12)?.parse().ok()?;
                Some((utime + stime) / USER_HZ)
            });
        let now = Instant::now();
        let cpu_percent = cpu_seconds.and_then(|cpu| {
            let mut last = self.last_cpu.lock().unwrap_or_else(|p| p.into_inner());
            let percent = last.and_then(|(at, before)| {
                let wall = now.duration_since(at).as_secs_f64();
                (wall > 0.0).then(|| ((cpu - before) / wall * 100.0).max(0.0))
            });
            *last = Some((now, cpu));
            percent
        });
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| {
                limits
                    .lines()
                    .find(|l| l.starts_with("Max open files"))?
                    .split_whitespace()
                    .nth(3)?
                    .parse()
                    .ok()
            });
        ProcessReading {
            rss_bytes,
            memory_limit_bytes: memory_limit(),
            cpu_seconds,
            cpu_percent,
            threads,
            open_fds,
            max_fds,
        }
    }
}

fn memory_limit() -> Option<u64> {
    // cgroup v2: this process's own group (`0::/path`), then the root.
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|groups| {
            let path = groups
                .lines()
                .find_map(|l| l.strip_prefix("0::"))?
                .trim()
                .to_owned();
            Some(format!("/sys/fs/cgroup{path}/memory.max"))
        });
    let cgroup = own
        .iter()
        .map(String::as_str)
        .chain(["/sys/fs/cgroup/memory.max"])
        .find_map(|file| {
            std::fs::read_to_string(file)
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        });
    cgroup.or_else(|| {
        std::fs::read_to_string("/proc/meminfo")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
            .map(|kb| kb * 1024)
    })
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let sampler = ProcessSampler::new();
        let first = sampler.sample();
        assert!(first.rss_bytes.unwrap() > 1024 * 1024, "{first:?}");
        assert!(first.threads.unwrap() >= 1);
        assert!(first.open_fds.unwrap() >= 3);
        assert!(first.max_fds.unwrap() >= first.open_fds.unwrap());
        assert!(first.cpu_percent.is_none(), "no previous reading yet");
        // Burn a little CPU so the second reading has something to say.
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 50 {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let second = sampler.sample();
        assert!(second.cpu_percent.unwrap() >= 0.0);
        let ratio = second.memory_used_ratio().unwrap();
        assert!(ratio > 0.0 && ratio < 1.0, "{ratio}");
    }
}
