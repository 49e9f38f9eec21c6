//! Redis and PostgreSQL servers of a test's own, on free ports, for the tests that stop and restart
//! them (the checklist's scenarios F and G) — never the machine's shared servers. Each one is
//! stopped when dropped; the PostgreSQL data directory is removed with it.

use std::{path::PathBuf, process::Stdio, time::Duration};

use parley::store::{self, PgStore};
use secrecy::SecretString;
use sqlx::{Connection, PgConnection};
use tokio::process::{Child, Command};

use super::{eventually, free_port};

/// How long a server may take to answer after (re)starting.
const START_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Redis

/// `redis-server` as a child process: in memory only (`--save ''`, no AOF), so a restart comes
/// back empty, like a Redis that lost its data.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub async fn start() -> Self {
        let mut server = Self { port: free_port(), child: None };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: Redis disappears without a goodbye, as in a crash.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port (stopping it first if it runs) and waits for PING.
    pub async fn restart(&mut self) {
        self.stop().await;
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server must be installed for these tests");
        self.child = Some(child);
        let url = SecretString::from(self.url());
        eventually(START_TIMEOUT, &format!("redis-server on port {port} to answer PING"), || {
            let url = url.clone();
            async move { parley::kv::connect(&url).await.ok().map(|_| ()) }
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The superuser of the test's cluster, and — initdb and pg_ctl refuse to run as root — the OS
/// user the server runs as when the tests run as root.
const PG_USER: &str = "postgres";

/// A PostgreSQL 15 server of the test's own: a fresh cluster in a temporary directory, listening
/// on 127.0.0.1 and a free port, with the database `parley` migrated (pgvector comes from the
/// system's PostgreSQL 15, whose libraries this server uses).
pub struct PgServer {
    port: u16,
    /// Holds `data/` (the cluster) and `run/` (the socket and the server log), owned by the
    /// server's OS user. Removed after `drop` has stopped the server.
    dir: tempfile::TempDir,
    running: bool,
    store: PgStore,
}

impl PgServer {
    /// initdb (without fsync), start, create and migrate `parley`: about a second and a half.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        for sub in ["data", "run"] {
            std::fs::create_dir(dir.path().join(sub)).expect("create the server's directories");
        }
        if running_as_root() {
            // The temporary directory is root's and private: let `postgres` through to its own dirs.
            std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .expect("open the temporary directory to postgres");
            run_checked(Command::new("chown").arg("-R").arg(format!("{PG_USER}:")).arg(dir.path()), "chown").await;
        }
        let data = dir.path().join("data");
        run_checked(
            Command::from(pg_program("initdb")).arg("-D").arg(&data).args([
                "-A",
                "trust",
                "-U",
                PG_USER,
                "--no-sync",
                "--no-instructions",
                "-E",
                "UTF8",
            ]),
            "initdb",
        )
        .await;

        let port = free_port();
        // Lazy: the pool connects once the database exists, and again after each restart.
        let pool = store::connect_lazy(&SecretString::from(parley_url(port))).expect("a valid URL");
        let mut server = Self { port, dir, running: false, store: PgStore::new(pool) };
        server.restart().await;

        let admin = format!("postgres://{PG_USER}@127.0.0.1:{port}/postgres");
        let mut conn = PgConnection::connect(&admin).await.expect("connect to the test's PostgreSQL");
        sqlx::query("CREATE DATABASE parley").execute(&mut conn).await.expect("create the database parley");
        let _ = conn.close().await;
        store::migrate(server.store.pool()).await.expect("migrate parley");
        server
    }

    /// The URL of the database `parley`.
    pub fn url(&self) -> String {
        parley_url(self.port)
    }

    /// What `Options.database` takes: the URL, and a store whose pool reconnects after a restart.
    pub fn database(&self) -> (SecretString, PgStore) {
        (SecretString::from(self.url()), self.store.clone())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// `pg_ctl stop -m immediate`: every backend killed, no checkpoint, as in a crash.
    pub async fn stop(&mut self) {
        if self.running {
            run_checked(
                Command::from(pg_program("pg_ctl")).arg("-D").arg(self.data_dir()).args(["-m", "immediate", "stop"]),
                "pg_ctl stop",
            )
            .await;
            self.running = false;
        }
    }

    /// Starts the server on the same port (stopping it first if it runs); returns once it accepts
    /// connections (pg_ctl -w).
    pub async fn restart(&mut self) {
        self.stop().await;
        // fsync=off only risks data on an OS crash; an immediate stop keeps every commit. Not
        // synchronous_commit=off: commits of the last moments before the stop would be lost.
        let options =
            format!("-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off", self.port, self.run_dir().display());
        let log = self.run_dir().join("server.log");
        let started = Command::from(pg_program("pg_ctl"))
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(options)
            .args(["-w", "-t", &START_TIMEOUT.as_secs().to_string(), "start"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("cannot run pg_ctl");
        assert!(
            started.status.success(),
            "PostgreSQL did not start on port {}:\n{}",
            self.port,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.running = true;
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // Synchronous on purpose: this may run while a test unwinds, and the server must not outlive it.
        // The directory goes afterwards, with the fields.
        if self.running {
            let _ = pg_program("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn parley_url(port: u16) -> String {
    format!("postgres://{PG_USER}@127.0.0.1:{port}/parley")
}

/// A PostgreSQL program of the system's version 15, run as `postgres` when we are root.
fn pg_program(program: &str) -> std::process::Command {
    let program = format!("{PG_BIN}/{program}");
    if running_as_root() {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", PG_USER, "--", &program]);
        cmd
    } else {
        std::process::Command::new(program)
    }
}

fn running_as_root() -> bool {
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// Runs a set-up command to its end; panics with its output when it fails.
async fn run_checked(cmd: &mut Command, what: &str) {
    let out = cmd.stdin(Stdio::null()).output().await.unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
