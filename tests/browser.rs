//! Browser tests: headless Debian Chromium, driven by playwright-core from
//! `tests/browser/`, against the real gateway in this process.
//!
//! Each test starts a [`BrowserEnv`] — a fake upstream, the gateway, and
//! two host-page servers on origins of their own — and runs one scenario,
//! `tests/browser/scenarios/<name>.mjs`, with `node tests/browser/run.mjs`.
//! The scenario's output is printed as it comes; a non-zero exit fails the
//! test with that output. `scripts/test.sh` installs Chromium, Node.js and
//! the node packages; without them these tests fail (never skip). They run
//! one at a time (the `browser` test group in `.config/nextest.toml`).
//! docs/testing.md says how to write a scenario.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure
#![allow(dead_code)] // BrowserEnv offers more than each scenario uses

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpListener;

/// `tests/browser`: the node package, its scenarios and host pages.
fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Longest a scenario process may run. The harness cuts itself off at 60 s;
/// this catches a node that hangs anyway (nextest's slow-timeout is the
/// last resort).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(90);

/// Everything a scenario needs on the machine, or a panic that says to run
/// `scripts/test.sh`. Returns the Chromium to use.
fn require_browser_tools() -> PathBuf {
    let chromium = std::env::var_os("SPILLWAY_TEST_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        chromium.is_file(),
        "no Chromium at {}: run scripts/test.sh (it installs Debian's chromium) or set SPILLWAY_TEST_CHROMIUM",
        chromium.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|out| out.status.success()),
        "no `node` on PATH: run scripts/test.sh (it installs Node.js)"
    );
    let playwright = browser_dir().join("node_modules/playwright-core/package.json");
    assert!(
        playwright.is_file(),
        "{} is missing: run scripts/test.sh (it runs npm ci in tests/browser)",
        playwright.display()
    );
    chromium
}

/// A static server for `tests/browser/pages/` on its own loopback port, so
/// its pages have an origin of their own. `{{GATEWAY}}` in a served text
/// file becomes the gateway's base URL.
struct HostPages {
    url: String,
    server: tokio::task::JoinHandle<()>,
}

/// The gateway URL, known only once the gateway has started (after the host
/// servers, whose origins its config may name).
type GatewayUrl = Arc<OnceLock<String>>;

impl HostPages {
    async fn start(gateway: GatewayUrl) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind host");
        let url = format!("http://{}", listener.local_addr().expect("host addr"));
        let app = axum::Router::new().fallback(serve_page).with_state(gateway);
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("host pages serve");
        });
        Self { url, server }
    }
}

impl Drop for HostPages {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// `GET /<file>`: a file straight under `tests/browser/pages/`.
async fn serve_page(State(gateway): State<GatewayUrl>, uri: Uri) -> Response {
    let name = uri.path().trim_start_matches('/');
    // Only plain file names: nothing outside the pages directory.
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Ok(bytes) = tokio::fs::read(browser_dir().join("pages").join(name)).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let content_type = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    };
    let body = match String::from_utf8(bytes) {
        Ok(text) => {
            let gateway = gateway
                .get()
                .expect("the gateway started before any page is served");
            text.replace("{{GATEWAY}}", gateway).into_bytes()
        }
        Err(binary) => binary.into_bytes(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// What a test's config may refer to: the environment around the gateway,
/// started before it.
struct Peers<'a> {
    upstream: &'a FakeUpstream,
    /// Base URL of the host-page server a widget config would allow.
    host_allowed: &'a str,
    /// Base URL of a second host-page server (an origin not allowed).
    host_other: &'a str,
}

/// One browser test's world: a fake upstream, the real gateway, and two
/// host-page servers on two more origins.
struct BrowserEnv {
    /// The gateway's provider; queue scripts on it before a scenario sends.
    upstream: FakeUpstream,
    gateway: TestGateway,
    /// Serves `tests/browser/pages/` (`HOST_ALLOWED_URL`).
    host_allowed: HostPages,
    /// Serves the same pages from another origin (`HOST_OTHER_URL`).
    host_other: HostPages,
    chromium: PathBuf,
    /// The gateway's data dir when the config left it at the default.
    _data_dir: Option<tempfile::TempDir>,
}

impl BrowserEnv {
    /// The default world: one OpenAI-kind provider `fake` at the fake
    /// upstream serving model `gpt-test`, persistence on in a temp dir.
    async fn start() -> Self {
        Self::start_with(|peers| openai_config(peers.upstream)).await
    }

    /// A world whose gateway runs the config `toml` returns (it may name the
    /// upstream's URL and the host origins). An unset `store.data_dir`
    /// becomes a temp dir.
    async fn start_with(toml: impl FnOnce(&Peers<'_>) -> String) -> Self {
        let chromium = require_browser_tools();
        let upstream = FakeUpstream::start().await;
        let gateway_url = GatewayUrl::default();
        let host_allowed = HostPages::start(Arc::clone(&gateway_url)).await;
        let host_other = HostPages::start(Arc::clone(&gateway_url)).await;
        let mut config = test_config(&toml(&Peers {
            upstream: &upstream,
            host_allowed: &host_allowed.url,
            host_other: &host_other.url,
        }));
        let data_dir = (config.store.data_dir == spillway::config::StoreConfig::default().data_dir)
            .then(|| {
                let dir = tempfile::tempdir().expect("tempdir");
                config.store.data_dir = dir.path().display().to_string();
                dir
            });
        let gateway = TestGateway::start_with(config).await;
        gateway_url
            .set(gateway.url(""))
            .expect("the gateway URL is set once");
        Self {
            upstream,
            gateway,
            host_allowed,
            host_other,
            chromium,
            _data_dir: data_dir,
        }
    }

    /// The scenario's `SCENARIO_ENV`: the three base URLs plus `extra`'s
    /// fields (an object, or null for none).
    fn scenario_env(&self, extra: Value) -> Value {
        let mut env = json!({
            "SPILLWAY_URL": self.gateway.url(""),
            "HOST_ALLOWED_URL": self.host_allowed.url,
            "HOST_OTHER_URL": self.host_other.url,
        });
        match extra {
            Value::Null => {}
            Value::Object(fields) => env.as_object_mut().unwrap().extend(fields),
            other => panic!("extra_env must be a JSON object, got {other}"),
        }
        env
    }

    /// Runs `tests/browser/scenarios/<name>.mjs`, printing its output as it
    /// comes, and panics with all of it unless the scenario passed.
    async fn run_scenario(&self, name: &str, extra_env: Value) {
        let env = self.scenario_env(extra_env);
        let mut child = tokio::process::Command::new("node")
            .arg("run.mjs")
            .arg(name)
            .current_dir(browser_dir())
            .env("SCENARIO_ENV", env.to_string())
            .env("SPILLWAY_TEST_CHROMIUM", &self.chromium)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node");
        let output = Arc::new(Mutex::new(String::new()));
        let stdout = tokio::spawn(echo(child.stdout.take().unwrap(), Arc::clone(&output)));
        let stderr = tokio::spawn(echo(child.stderr.take().unwrap(), Arc::clone(&output)));
        let status = tokio::time::timeout(SCENARIO_TIMEOUT, child.wait()).await;
        let status = match status {
            Ok(status) => status.expect("wait for node"),
            Err(_) => {
                child.kill().await.ok();
                panic!(
                    "scenario {name} ran past {SCENARIO_TIMEOUT:?} and was killed; its output:\n{}",
                    output.lock().unwrap()
                );
            }
        };
        stdout.await.expect("stdout reader");
        stderr.await.expect("stderr reader");
        assert!(
            status.success(),
            "scenario {name} failed ({status}); its output:\n{}",
            output.lock().unwrap()
        );
    }
}

/// Prints each line of `from` as it arrives and keeps it in `into`.
#[allow(clippy::print_stdout)] // the test's own output: nextest shows it on failure
async fn echo(from: impl AsyncRead + Unpin, into: Arc<Mutex<String>>) {
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        println!("{line}");
        let mut all = into.lock().unwrap();
        all.push_str(&line);
        all.push('\n');
    }
}

#[tokio::test]
async fn demo_page_loads_without_console_errors() {
    let env = BrowserEnv::start().await;
    env.run_scenario("demo_page_loads", Value::Null).await;
}

#[tokio::test]
async fn host_pages_are_served_from_origins_of_their_own() {
    let env = BrowserEnv::start().await;
    env.run_scenario("host_page_origin", Value::Null).await;
}

/// The words the fake upstream streams for widget scenarios, and the
/// answer they make.
fn answer_tokens(n: usize) -> (Vec<String>, String) {
    let words = [
        "Spillway", "relays", "every", "token", "as", "it", "streams,", "and", "a", "reply",
        "survives", "reloads", "and", "dropped", "sockets.",
    ];
    let tokens: Vec<String> = (0..n)
        .map(|i| {
            let word = words[i % words.len()];
            if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            }
        })
        .collect();
    let text = tokens.concat();
    (tokens, text)
}

/// A world whose upstream answers every request with `n` paced tokens;
/// returns it with the answer's text.
async fn paced_world(n: usize, pace_ms: u64) -> (BrowserEnv, String) {
    let env = BrowserEnv::start().await;
    let (tokens, text) = answer_tokens(n);
    env.upstream.set_default(openai_stream(
        &refs(&tokens),
        Duration::from_millis(pace_ms),
    ));
    (env, text)
}

fn refs(tokens: &[String]) -> Vec<&str> {
    tokens.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn demo_page_widget_streams_an_answer_in_many_updates() {
    let (env, text) = paced_world(30, 60).await;
    env.run_scenario("widget_streams", json!({ "EXPECTED_TEXT": text }))
        .await;
}

#[tokio::test]
async fn reload_mid_answer_resumes_to_the_full_answer_without_duplicates() {
    let (env, text) = paced_world(40, 60).await;
    env.run_scenario("widget_reload", json!({ "EXPECTED_TEXT": text }))
        .await;
}

#[tokio::test]
async fn killed_websocket_reconnects_and_the_answer_completes() {
    let (env, text) = paced_world(40, 60).await;
    env.run_scenario("widget_socket_killed", json!({ "EXPECTED_TEXT": text }))
        .await;
}

#[tokio::test]
async fn second_tab_of_the_same_visitor_shows_the_conversation_live() {
    let (env, text) = paced_world(40, 60).await;
    env.run_scenario("widget_second_tab", json!({ "EXPECTED_TEXT": text }))
        .await;
}

#[tokio::test]
async fn markup_in_model_output_renders_as_text() {
    let env = BrowserEnv::start().await;
    let tokens = [
        "Here: <script>window.xssScript = 1</script>",
        " and <img src=x onerror=\"window.xssImage = 1\">",
        " and [click me](javascript:window.xssLink=1)",
        " and <b onclick=\"window.xssLink = 2\">bold?</b>",
    ];
    env.upstream
        .set_default(openai_stream(&tokens, Duration::from_millis(20)));
    env.run_scenario(
        "widget_untrusted_output",
        json!({ "EXPECTED_TEXT": tokens.concat() }),
    )
    .await;
}

#[tokio::test]
async fn host_page_css_does_not_reach_the_widget() {
    let (env, text) = paced_world(8, 20).await;
    env.run_scenario("widget_host_css", json!({ "EXPECTED_TEXT": text }))
        .await;
}

#[tokio::test]
async fn narrow_viewport_gets_the_full_screen_panel() {
    let (env, text) = paced_world(30, 40).await;
    env.run_scenario("widget_mobile", json!({ "EXPECTED_TEXT": text }))
        .await;
}

#[tokio::test]
async fn sse_transport_streams_without_a_websocket() {
    let (env, text) = paced_world(30, 40).await;
    env.run_scenario("widget_sse", json!({ "EXPECTED_TEXT": text }))
        .await;
}

#[tokio::test]
async fn embed_works_from_an_allowed_origin_and_is_refused_elsewhere() {
    const KEY: &str = "pk_browser_embed";
    // Development mode honours configured widgets (signed with a secret of
    // the process), so no secret has to be put in the environment.
    let env = BrowserEnv::start_with(|peers| {
        format!(
            "{}\n[[auth.widgets]]\nkey = \"{KEY}\"\ntenant = \"acme\"\norigins = [\"{}\"]\n",
            openai_config(peers.upstream),
            peers.host_allowed,
        )
    })
    .await;
    let (tokens, text) = answer_tokens(20);
    env.upstream
        .set_default(openai_stream(&refs(&tokens), Duration::from_millis(30)));
    env.run_scenario(
        "embed_origins",
        json!({ "EXPECTED_TEXT": text, "WIDGET_KEY": KEY }),
    )
    .await;
}

#[tokio::test]
async fn widget_and_sdk_stay_under_40_kb_minified() {
    let env = BrowserEnv::start().await;
    env.run_scenario("bundle_size", Value::Null).await;
}
