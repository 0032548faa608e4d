//! The processes a scenario runs: `spillway serve` on its own config and
//! data dir, and throwaway `redis-server`s; their RSS and CPU time read
//! from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// How the gateway is set up for a run.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    pub bin: PathBuf,
    pub upstream: String,
    pub node: String,
    pub redis: Option<String>,
    /// `store.database_url`: a SQLite file or a PostgreSQL server shared
    /// by several instances (default: a SQLite file in the data dir).
    pub database: Option<String>,
    /// More TOML appended to the generated config.
    pub extra: String,
    /// The port (default: a free one, kept across restarts).
    pub port: Option<u16>,
}

/// A `spillway serve` process. Killed on drop.
#[derive(Debug)]
pub struct Gateway {
    child: Option<Child>,
    pub addr: std::net::SocketAddr,
    pub pid: u32,
    pub options: GatewayOptions,
    dir: tempfile::TempDir,
}

/// The port a restarted instance listens on again.
fn port_of(options: &GatewayOptions) -> u16 {
    options.port.unwrap_or_else(free_port)
}

impl Gateway {
    pub async fn start(options: GatewayOptions) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("spillway-loadtest-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        Self::start_in(options, dir).await
    }

    async fn start_in(mut options: GatewayOptions, dir: tempfile::TempDir) -> Result<Self, String> {
        let port = port_of(&options);
        options.port = Some(port);
        let config = config(&options, dir.path());
        let path = dir.path().join("spillway.toml");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.path().join("gateway.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&options.bin)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("run {}: {e}", options.bin.display()))?;
        let pid = child.id().unwrap_or(0);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut gateway = Self {
            child: Some(child),
            addr,
            pid,
            options,
            dir,
        };
        gateway.wait_ready().await?;
        Ok(gateway)
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let url = format!("{}/readyz", self.base());
        loop {
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("gateway exited ({status}): {}", self.log_tail()));
            }
            if Instant::now() > deadline {
                return Err(format!("gateway not ready in 60 s: {}", self.log_tail()));
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    /// Resident set size, KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }

    /// User + system CPU seconds so far.
    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(self.pid)
    }

    pub async fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid.to_string()])
            .status()
            .await;
    }

    /// SIGKILL, and wait for the process to go.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM, and wait (up to `within`) for it to exit.
    pub async fn terminate(&mut self, within: Duration) -> bool {
        self.signal("TERM").await;
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let exited = tokio::time::timeout(within, child.wait()).await.is_ok();
        if !exited {
            let _ = child.kill().await;
        }
        exited
    }

    /// Starts the same instance again (same node, config and data dir).
    pub async fn restart(mut self) -> Result<Self, String> {
        self.kill().await;
        let options = self.options.clone();
        let dir = std::mem::replace(
            &mut self.dir,
            tempfile::tempdir().map_err(|e| e.to_string())?,
        );
        Self::start_in(options, dir).await
    }
}

fn config(options: &GatewayOptions, dir: &Path) -> String {
    let redis = options
        .redis
        .as_ref()
        .map(|url| format!("redis_url = \"{url}\"\nheartbeat_ms = 500\nposition_check_ms = 250\n"))
        .unwrap_or_default();
    let database = options
        .database
        .as_ref()
        .map(|url| format!("database_url = \"{url}\"\n"))
        .unwrap_or_default();
    format!(
        r#"
[log]
level = "warn"
format = "json"

[limits]
enabled = false

# Connection caps hold even with rate limits off; the scenarios open
# many connections per user and per tenant on purpose.
[[limits.tiers]]
name = "default"
max_connections_per_user = 1000000
max_connections_per_tenant = 1000000

[generation]
max_live = 200000

[chat]
default_model = "paced"
max_connection_secs = 0
max_generations_per_user = 64

[cluster]
node_id = "{node}"
{redis}
[store]
data_dir = "{data}"
{database}
[[providers]]
name = "paced"
kind = "openai"
base_url = "{upstream}"

[[models]]
name = "paced"
targets = [{{ provider = "paced", model = "paced" }}]
{extra}
"#,
        node = options.node,
        data = dir.display(),
        upstream = options.upstream,
        extra = options.extra,
    )
}

/// `VmRSS` of `pid`, KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of `pid` in seconds (clock ticks of 1/100 s).
pub fn cpu_secs(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(0.0)
}

/// The soft limit on open files of this process (scenarios stay under it;
/// children inherit it).
pub fn open_files_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(1024)
}

/// A throwaway `redis-server` on a free loopback port, no persistence.
#[derive(Debug)]
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("spillway-loadtest-redis-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let mut redis = Self {
            child: None,
            port: free_port(),
            dir,
        };
        redis.run().await?;
        Ok(redis)
    }

    async fn run(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("run redis-server: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            sleep(Duration::from_millis(20)).await;
        }
        Err("redis-server did not start".into())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    pub async fn restart(&mut self) -> Result<(), String> {
        self.stop().await;
        self.run().await
    }
}

/// A PostgreSQL server of the scenario's own (a fresh cluster in a temp
/// dir, trust auth, a free port) that it can stop and start. As root, the
/// commands run as the `postgres` OS user (`initdb` refuses root).
#[derive(Debug)]
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl Postgres {
    pub async fn start() -> Result<Self, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("PostgreSQL is not installed: {e}"))?
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .ok_or("no initdb under /usr/lib/postgresql")?;
        let dir = tempfile::Builder::new()
            .prefix("spillway-loadtest-pg-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        if is_root() {
            let _ = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .await;
        }
        let pg = Self {
            dir,
            bin,
            port: free_port(),
        };
        let data = pg.dir.path().join("data");
        pg.run(
            "initdb",
            &[
                "-D",
                &data.display().to_string(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .await?;
        pg.up().await?;
        Ok(pg)
    }

    async fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(program));
            c
        } else {
            Command::new(self.bin.join(program))
        };
        let output = command
            .args(args)
            .output()
            .await
            .map_err(|e| e.to_string())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{program}: {}",
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    pub async fn up(&self) -> Result<(), String> {
        let data = self.dir.path().join("data").display().to_string();
        let log = self.dir.path().join("server.log").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-t", "60", "-o", &options, "start",
            ],
        )
        .await
    }

    pub async fn down(&self) -> Result<(), String> {
        let data = self.dir.path().join("data").display().to_string();
        self.run("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])
            .await
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
