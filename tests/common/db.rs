//! Real databases for tests: SQLite files in a temporary directory, a fresh
//! PostgreSQL database per test on the shared server, and a throwaway
//! PostgreSQL server of a test's own for fault tests (stop it, start it).
//!
//! PostgreSQL is found at `SPILLWAY_TEST_POSTGRES_URL`, by default
//! `postgres://postgres@127.0.0.1:5432/test` (trust auth). When it is not
//! reachable the tests fail and say so: a suite that skips itself silently
//! proves nothing.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use spillway::config::StoreConfig;
use spillway::store::{self, Store};
use sqlx::{Connection, Executor, PgConnection};
use tempfile::TempDir;

/// The shared server's URL when `SPILLWAY_TEST_POSTGRES_URL` is not set.
pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The shared PostgreSQL server tests create their databases on.
pub fn postgres_url() -> String {
    std::env::var("SPILLWAY_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.to_owned())
}

/// A store configuration for `url` with a small pool.
pub fn store_config(url: &str) -> StoreConfig {
    StoreConfig {
        database_url: Some(url.to_owned()),
        max_connections: 4,
        ..StoreConfig::default()
    }
}

/// Opens the store at `url` without migrating it.
pub async fn open_store(url: &str) -> Arc<dyn Store> {
    store::open(&store_config(url))
        .await
        .unwrap_or_else(|err| panic!("opening {}: {err}", redact(url)))
}

/// Opens the store at `url` and migrates it.
pub async fn migrated_store(url: &str) -> Arc<dyn Store> {
    let store = open_store(url).await;
    store.migrate().await.expect("migrations apply");
    store
}

/// The URL of a SQLite file in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("spillway.db").display())
}

/// A migrated SQLite store in a file under `dir`.
pub async fn sqlite_store(dir: &Path) -> Arc<dyn Store> {
    migrated_store(&sqlite_url(dir)).await
}

/// A migrated store in a fresh PostgreSQL database, and the guard that drops
/// the database.
pub async fn postgres_store() -> (Arc<dyn Store>, TestDatabase) {
    let db = TestDatabase::create().await;
    (migrated_store(db.url()).await, db)
}

/// A fresh, empty PostgreSQL database (not migrated) and its URL; the guard
/// drops it.
pub async fn postgres_database() -> (TestDatabase, String) {
    let db = TestDatabase::create().await;
    let url = db.url().to_owned();
    (db, url)
}

/// `url` without its password, for messages.
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable url>".to_owned(),
    }
}

async fn connect_admin(url: &str) -> PgConnection {
    let connect = PgConnection::connect(url);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => panic!(
            "PostgreSQL is not reachable at {} ({err}). These tests need a real \
             server: start one, or point SPILLWAY_TEST_POSTGRES_URL at one (the role \
             must be allowed to CREATE DATABASE).",
            redact(url)
        ),
        Err(_) => panic!(
            "PostgreSQL at {} did not answer within 10 s; start it or set \
             SPILLWAY_TEST_POSTGRES_URL",
            redact(url)
        ),
    }
}

/// A database of its own on the shared server, created empty and dropped
/// when this guard drops (also when the test panics).
#[derive(Debug)]
pub struct TestDatabase {
    /// The server's URL, to drop the database from.
    admin_url: String,
    /// `spillway_test_<uuid>`.
    name: String,
    /// The URL of the database itself.
    url: String,
}

impl TestDatabase {
    /// Creates `spillway_test_<uuid>` on [`postgres_url`]'s server.
    pub async fn create() -> Self {
        let admin_url = postgres_url();
        let name = format!("spillway_test_{}", uuid::Uuid::now_v7().simple());
        let mut conn = connect_admin(&admin_url).await;
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap_or_else(|err| panic!("CREATE DATABASE {name}: {err}"));
        let _ = conn.close().await;
        let mut url = reqwest::Url::parse(&admin_url).expect("the PostgreSQL URL parses");
        url.set_path(&format!("/{name}"));
        Self {
            admin_url,
            name,
            url: url.to_string(),
        }
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop cannot await, and may run inside a runtime: use a thread with
        // a runtime of its own. FORCE ends the store's pooled connections.
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = PgConnection::connect(&admin_url).await.ok()?;
                conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                    .await
                    .ok()?;
                Some(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

/// A PostgreSQL server of the test's own: a fresh cluster in a temporary
/// directory on a free port, with trust auth, that the test can stop and
/// start (fast shutdown) to play a database outage. Stopped on drop.
///
/// `initdb` refuses to run as root, so as root every command runs as the
/// `postgres` OS user (`runuser -u postgres --`), which owns the directory.
#[derive(Debug)]
pub struct ThrowawayPostgres {
    /// Holds the cluster (`data/`), its log and its Unix socket.
    dir: TempDir,
    /// `initdb` and `pg_ctl` live here.
    bin: PathBuf,
    /// Kept across restarts, so the URL stays valid.
    port: u16,
    /// Whether drop has a server to stop.
    running: AtomicBool,
}

impl ThrowawayPostgres {
    /// Creates a cluster (`initdb`) and starts its server.
    pub async fn start_new() -> Self {
        let bin = postgres_bin();
        let dir = tempfile::Builder::new()
            .prefix("spillway-pg-")
            .tempdir()
            .expect("temporary directory");
        if is_root() {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(dir.path());
            run_checked(chown, "chown the cluster directory to postgres").await;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let server = Self {
            dir,
            bin,
            port,
            running: AtomicBool::new(false),
        };
        let mut initdb = server.command("initdb");
        initdb.arg("-D").arg(server.data_dir()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]);
        run_checked(initdb, "initdb").await;
        server.start().await;
        server
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn start(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o", &options, "start"]);
        let output = tokio::process::Command::from(pg_ctl)
            .output()
            .await
            .expect("pg_ctl runs");
        if !output.status.success() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            panic!(
                "pg_ctl start failed: {}\nserver log:\n{log}",
                describe(&output)
            );
        }
        self.running.store(true, Ordering::SeqCst);
    }

    /// Stops the server (fast shutdown: open connections are cut) and waits
    /// until it is down.
    pub async fn stop(&self) {
        let mut pg_ctl = self.command("pg_ctl");
        pg_ctl
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "stop"]);
        run_checked(pg_ctl, "pg_ctl stop").await;
        self.running.store(false, Ordering::SeqCst);
    }

    /// The `postgres` database on this server.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `bin/<program>`, as the `postgres` user when we are root.
    fn command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            Command::new(program)
        }
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        if self.running.load(Ordering::SeqCst) {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin`, or
/// `SPILLWAY_TEST_POSTGRES_BIN`.
fn postgres_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("SPILLWAY_TEST_POSTGRES_BIN") {
        return PathBuf::from(bin);
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin (install \
             postgresql, or set SPILLWAY_TEST_POSTGRES_BIN to the directory holding \
             initdb and pg_ctl)"
        ),
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0)
}

async fn run_checked(command: Command, what: &str) {
    let output = tokio::process::Command::from(command)
        .output()
        .await
        .unwrap_or_else(|err| panic!("{what}: cannot run: {err}"));
    assert!(
        output.status.success(),
        "{what} failed: {}",
        describe(&output)
    );
}

fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}
