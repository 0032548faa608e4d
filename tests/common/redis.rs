//! A Redis server of the test's own: a real `redis-server` on a free
//! loopback port, in a temporary directory, with no persistence, that the
//! test can stop (an outage) and start again on the same port, empty.
//! Killed on drop.
//!
//! The binary is `redis-server` from `PATH` (`scripts/test.sh` installs it),
//! or `SPILLWAY_TEST_REDIS_SERVER`. The shared server on 127.0.0.1:6379, if
//! any, is never touched.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long a start or a stop may take before the test fails.
const STARTUP: Duration = Duration::from_secs(20);

/// A throwaway `redis-server`. See the module docs.
#[derive(Debug)]
pub struct RedisServer {
    /// Holds the server's log (`redis.log`) and its working directory.
    dir: TempDir,
    /// Kept across restarts, so the URL stays valid.
    port: u16,
    /// The running server, if any (behind a lock so a test can stop and
    /// start it through a shared reference).
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub async fn start_new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("spillway-redis-")
            .tempdir()
            .expect("temporary directory");
        let mut server = Self {
            dir,
            port: 0,
            child: Mutex::new(None),
        };
        // The free port is found by binding and releasing it, so another
        // process may take it in between: then try another one.
        for attempt in 1..=5 {
            server.port = free_port();
            match server.try_start().await {
                Ok(()) => return server,
                Err(why) if attempt < 5 => {
                    eprintln!(
                        "redis-server on port {} did not start ({why}); retrying",
                        server.port
                    );
                }
                Err(why) => panic!("redis-server did not start: {why}\n{}", server.log()),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Starts the server again (after [`stop`](Self::stop) or
    /// [`kill`](Self::kill)) on the same port, with no data. Waits until it
    /// answers `PING`.
    pub async fn start(&self) {
        assert!(!self.is_running(), "redis-server is already running");
        if let Err(why) = self.try_start().await {
            panic!(
                "redis-server did not restart on port {}: {why}\n{}",
                self.port,
                self.log()
            );
        }
    }

    /// Stops the server with SIGTERM (SIGKILL if it lingers) and waits until
    /// the process has exited, so the port is free and every client
    /// connection is cut.
    pub async fn stop(&self) {
        let Some(mut child) = self.take_child() else {
            return;
        };
        send_signal(child.id(), "TERM").await;
        if wait_exit(&mut child, STARTUP).await.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server with SIGKILL (a crash) and waits until it is gone.
    pub async fn kill(&self) {
        if let Some(mut child) = self.take_child() {
            let _ = child.kill();
            let _ = wait_exit(&mut child, STARTUP).await;
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.lock().unwrap().is_some()
    }

    fn take_child(&self) -> Option<Child> {
        self.child.lock().unwrap().take()
    }

    /// Whether the server answers `PING` with `+PONG` right now.
    pub async fn ping(&self) -> bool {
        ping(self.port).await
    }

    /// Everything the server logged so far (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Spawns the server on `self.port` and waits for `PING`; on failure the
    /// process is gone and the reason is returned.
    async fn try_start(&self) -> Result<(), String> {
        // Nothing to load: each run starts empty.
        let _ = std::fs::remove_file(self.dir.path().join("dump.rdb"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|err| format!("opening the log: {err}"))?;
        let stderr = log
            .try_clone()
            .map_err(|err| format!("cloning the log: {err}"))?;
        let mut child = Command::new(redis_server_bin())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .args(["--logfile", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|err| {
                format!(
                    "cannot run {} ({err}): install redis-server (scripts/test.sh does) \
                     or set SPILLWAY_TEST_REDIS_SERVER",
                    redis_server_bin().display()
                )
            })?;
        let deadline = Instant::now() + STARTUP;
        loop {
            if ping(self.port).await {
                *self.child.lock().unwrap() = Some(child);
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("it exited with {status}"));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no PONG within {STARTUP:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let child = match self.child.get_mut() {
            Ok(child) => child.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `redis-server`, or `SPILLWAY_TEST_REDIS_SERVER`.
fn redis_server_bin() -> PathBuf {
    std::env::var_os("SPILLWAY_TEST_REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Whether 127.0.0.1:`port` answers an inline `PING` with `+PONG`.
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut answer = Vec::new();
        let mut buffer = [0u8; 64];
        while !answer.ends_with(b"\r\n") {
            let n = stream.read(&mut buffer).await.ok()?;
            if n == 0 {
                return None;
            }
            answer.extend_from_slice(&buffer[..n]);
        }
        Some(answer.starts_with(b"+PONG"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), attempt).await,
        Ok(Some(true))
    )
}

/// Sends `SIG<signal>` (e.g. `"TERM"`, `"KILL"`, `"STOP"`, `"CONT"`) to `pid`
/// with `kill(1)` (the tests forbid unsafe code, so no `libc::kill`).
pub async fn send_signal(pid: u32, signal: &str) {
    let status = tokio::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .await
        .expect("kill(1) runs");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

/// Waits (polling, without blocking the runtime) until `child` exits.
async fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
