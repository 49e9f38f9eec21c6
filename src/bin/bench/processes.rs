//! The processes a run starts (`parley serve|api|worker`, the bare server) and what the kernel
//! says about them: resident memory (`VmRSS`, `VmHWM` in `/proc/<pid>/status`) and CPU time
//! (`utime + stime` in `/proc/<pid>/stat`, all threads, in clock ticks of 10 ms).
//!
//! Every process is ended by its own pid: SIGTERM (graceful: Parley finishes its jobs in flight),
//! then SIGKILL if it lingers, and SIGKILL when the handle is dropped on an error path.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;

/// The kernel's clock tick for `/proc/<pid>/stat` times (`USER_HZ`), 100 on every Linux build
/// the benchmark targets.
const TICKS_PER_SECOND: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot start {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{what} exited before it was ready ({status}); its output is in {log}")]
    DiedEarly { what: String, status: String, log: String },
    #[error("{what} was not ready after {secs} s; its output is in {log}")]
    NotReady { what: String, secs: u64, log: String },
    #[error("{0}")]
    Other(String),
}

/// A process started by the benchmark.
pub struct Spawned {
    pub name: String,
    pub pid: u32,
    child: Child,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Spawned {
    /// Starts `binary role` with exactly `env` (nothing inherited but `PATH` and `HOME`), its
    /// output (one JSON line per event) going to `<logs>/<name>.log` as a log collector would take
    /// it.
    pub fn parley(
        binary: &Path,
        role: &str,
        name: &str,
        env: &BTreeMap<String, String>,
        workdir: &Path,
        logs: &Path,
    ) -> Result<Self, ProcessError> {
        let log = logs.join(format!("{name}.log"));
        let out = File::create(&log).map_err(|source| ProcessError::Spawn { what: name.into(), source })?;
        let err = out.try_clone().map_err(|source| ProcessError::Spawn { what: name.into(), source })?;
        let mut command = Command::new(binary);
        command.arg(role).current_dir(workdir).env_clear().envs(env).stdout(out).stderr(err).stdin(Stdio::null());
        for inherited in ["PATH", "HOME"] {
            if let Ok(value) = std::env::var(inherited) {
                command.env(inherited, value);
            }
        }
        let child = command.spawn().map_err(|source| ProcessError::Spawn {
            what: format!("{name} ({}): build it with `cargo build --release --bin parley`", binary.display()),
            source,
        })?;
        Ok(Self { name: name.into(), pid: child.id(), child, log })
    }

    /// Starts this benchmark's own `bare-server` (with `args`) and reads the address it prints.
    pub async fn bare_server(logs: &Path, args: &[&str]) -> Result<(Self, SocketAddr), ProcessError> {
        let name = "bare-server";
        let exe = std::env::current_exe().map_err(|source| ProcessError::Spawn { what: name.into(), source })?;
        let log = logs.join(format!("{name}.log"));
        let err = File::create(&log).map_err(|source| ProcessError::Spawn { what: name.into(), source })?;
        let mut child = Command::new(exe)
            .arg(name)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(err)
            .stdin(Stdio::null())
            .spawn()
            .map_err(|source| ProcessError::Spawn { what: name.into(), source })?;
        let stdout = child.stdout.take().ok_or_else(|| ProcessError::Other("no stdout pipe".into()))?;
        let pid = child.id();
        let spawned = Self { name: name.into(), pid, child, log };
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).map(|_| line)
        })
        .await
        .map_err(|e| ProcessError::Other(e.to_string()))?
        .map_err(|source| ProcessError::Spawn { what: name.into(), source })?;
        let addr =
            line.trim().strip_prefix("listening ").and_then(|a| a.parse().ok()).ok_or_else(|| {
                ProcessError::Other(format!("the bare server printed {line:?} instead of its address"))
            })?;
        Ok((spawned, addr))
    }

    /// Waits until `GET http://{addr}/health` answers 200.
    pub async fn wait_healthy(&mut self, addr: SocketAddr, timeout: Duration) -> Result<(), ProcessError> {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/health");
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let answer = client.get(&url).timeout(Duration::from_secs(1)).send().await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ProcessError::NotReady {
                    what: self.name.clone(),
                    secs: timeout.as_secs(),
                    log: self.log.display().to_string(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An error if the process has already exited.
    pub fn check_alive(&mut self) -> Result<(), ProcessError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ProcessError::DiedEarly {
                what: self.name.clone(),
                status: status.to_string(),
                log: self.log.display().to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn terminate(mut self, grace: Duration) -> Option<ExitStatus> {
        let _ = Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eprintln!("{} did not stop within {} s after SIGTERM: killing it", self.name, grace.as_secs());
        let _ = self.child.kill();
        self.child.wait().ok()
    }

    pub fn memory(&self) -> Memory {
        memory(self.pid)
    }

    pub fn cpu(&self) -> Duration {
        cpu_time(self.pid)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Resident memory, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the most that was ever resident.
    pub hwm_kib: u64,
}

pub fn memory(pid: u32) -> Memory {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return Memory::default() };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:") }
}

/// User + system CPU time of every thread of the process so far.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Duration::ZERO };
    // The command name (field 2) may hold spaces: count fields from after its closing parenthesis,
    // where field 3 (state) starts; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return Duration::ZERO };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
}

/// The CPU time of some processes at one moment, to subtract a later one from.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot(std::collections::HashMap<u32, Duration>);

impl CpuSnapshot {
    pub fn take(pids: &[u32]) -> Self {
        Self(pids.iter().map(|&pid| (pid, cpu_time(pid))).collect())
    }

    /// The CPU `pids` used since `earlier`; a process absent from `earlier` (started since)
    /// counts from zero.
    pub fn used_since(&self, earlier: &CpuSnapshot, pids: &[u32]) -> Duration {
        pids.iter()
            .map(|pid| {
                let now = self.0.get(pid).copied().unwrap_or_default();
                now.saturating_sub(earlier.0.get(pid).copied().unwrap_or_default())
            })
            .sum()
    }
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Samples the resident memory of some processes every 50 ms and keeps each one's peak.
pub struct PeakSampler {
    stop: Arc<AtomicBool>,
    task: JoinHandle<Vec<u64>>,
}

impl PeakSampler {
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut peaks = vec![0u64; pids.len()];
            while !flag.load(Ordering::Relaxed) {
                for (peak, pid) in peaks.iter_mut().zip(&pids) {
                    *peak = (*peak).max(memory(*pid).rss_kib);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peaks
        });
        Self { stop, task }
    }

    /// The peak `VmRSS` of each process, in the order given to `start`.
    pub async fn stop(self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}
