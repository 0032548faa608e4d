//! The real binary: `serve` with no config, `check-config`, keys from the
//! environment (and never in logs), and a SIGTERM drain.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::process::Command;

#[tokio::test]
async fn serve_without_a_config_file_streams_the_mock_model() {
    let process = Process::serve(&[], &[("SPILLWAY_PROVIDERS_IGNORED", "x")]).await;
    let models: Value = client()
        .get(process.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "mock");

    let response = client()
        .post(process.url("/v1/chat/completions"))
        .json(&chat_body("mock", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = SseReader::new(response).collect().await;
    let text = content_of(&events);
    assert!(
        text.starts_with("[mock] This reply comes from Spillway's built-in mock provider."),
        "{text}"
    );
    assert_eq!(
        text.split(' ').count(),
        48,
        "the default mock reply is 48 words"
    );
    assert_eq!(events.last(), Some(&ClientEvent::Done));

    let page = client()
        .get(process.url("/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("mock provider"));
}

#[tokio::test]
async fn check_config_accepts_the_example_and_rejects_bad_files_by_key() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/spillway.example.toml");
    let ok = Command::new(BIN)
        .args(["check-config", example])
        .output()
        .await
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    for (text, expected) in [
        (
            "[server]\nlisten = \"8080\"\n",
            ["server.listen", "\"8080\""],
        ),
        (
            "[server]\nheartbeat_secs = \"soon\"\n",
            ["server.heartbeat_secs", "soon"],
        ),
        (
            "[[models]]\nname = \"x\"\ntargets = [{ provider = \"nope\", model = \"y\" }]\n",
            ["models[0].targets[0].provider", "nope"],
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .arg("check-config")
            .arg(&path)
            .env_remove("SPILLWAY_LISTEN")
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for needle in expected {
            assert!(stderr.contains(needle), "{text}: {stderr}");
        }
    }
    let missing = Command::new(BIN)
        .args(["check-config", "/nonexistent/spillway.toml"])
        .output()
        .await
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}

#[tokio::test]
async fn provider_key_comes_from_the_environment_and_never_reaches_logs_or_clients() {
    let upstream = FakeUpstream::start().await;
    upstream.push(openai_stream(&["ok"], Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spillway.toml");
    let config = openai_config(&upstream).replace(
        "kind = \"openai\"",
        "kind = \"openai\"\napi_key_env = \"SPILLWAY_TEST_UPSTREAM_KEY\"",
    );
    std::fs::write(&path, config).unwrap();
    let secret = "sk-live-0123456789abcdef-SECRET";
    let process = Process::serve(
        &["--config", path.to_str().unwrap()],
        &[
            ("SPILLWAY_TEST_UPSTREAM_KEY", secret),
            ("SPILLWAY_LOG_LEVEL", "trace"),
        ],
    )
    .await;

    let mut body = chat_body("gpt-test", true);
    body["messages"][0]["content"] = "my private question about zebras".into();
    let response = client()
        .post(process.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let raw = response.text().await.unwrap();
    assert!(raw.ends_with("data: [DONE]\n\n"));
    assert!(!raw.contains(secret));
    let sent = &upstream.requests()[0];
    assert_eq!(sent.headers["authorization"], format!("Bearer {secret}"));

    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = process.log.lock().unwrap().clone();
    assert!(
        log.contains("generation started"),
        "the request was logged: {log}"
    );
    assert!(!log.contains(secret), "the key leaked into the log");
    assert!(
        !log.contains("zebras"),
        "message content leaked into the log"
    );
}

#[tokio::test]
async fn serve_refuses_to_start_when_a_key_variable_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spillway.toml");
    std::fs::write(
        &path,
        "[[providers]]\nname = \"openai\"\nkind = \"openai\"\napi_key_env = \"SPILLWAY_TEST_UNSET_KEY\"\n[[models]]\nname = \"m\"\ntargets = [{ provider = \"openai\", model = \"gpt-4o\" }]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&path)
        .env_remove("SPILLWAY_TEST_UNSET_KEY")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SPILLWAY_TEST_UNSET_KEY"), "{stderr}");
}

#[tokio::test]
async fn sigterm_lets_a_running_stream_finish_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spillway.toml");
    std::fs::write(
        &path,
        "[[providers]]\nname = \"mock\"\nkind = \"mock\"\nmock_tokens = 20\nmock_token_delay_ms = 25\n[[models]]\nname = \"mock\"\ntargets = [{ provider = \"mock\", model = \"mock\" }]\n",
    )
    .unwrap();
    let mut process = Process::serve(&["--config", path.to_str().unwrap()], &[]).await;
    let response = client()
        .post(process.url("/v1/chat/completions"))
        .json(&chat_body("mock", true))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    let mut events = Vec::new();
    while content_of(&events).is_empty() {
        events.push(reader.next().await.unwrap());
    }
    let pid = process.child.id().unwrap().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());

    events.extend(reader.collect().await);
    assert_eq!(
        content_of(&events).split(' ').count(),
        20,
        "the stream finished"
    );
    assert_eq!(events.last(), Some(&ClientEvent::Done));
    let status = tokio::time::timeout(Duration::from_secs(20), process.child.wait())
        .await
        .expect("exits after draining")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(process.log.lock().unwrap().contains("SIGTERM received"));
}

#[tokio::test]
async fn migrate_creates_the_schema_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spillway.toml");
    std::fs::write(
        &path,
        format!("[store]\ndata_dir = \"{}\"\n", dir.path().display()),
    )
    .unwrap();
    for _ in 0..2 {
        let out = Command::new(BIN)
            .args(["migrate", "--config"])
            .arg(&path)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("migrations applied (sqlite)"));
    }
    // The tables are there: the store answers a query on them.
    let store = spillway::store::open(&spillway::config::StoreConfig {
        data_dir: dir.path().display().to_string(),
        ..spillway::config::StoreConfig::default()
    })
    .await
    .unwrap();
    let owner = spillway::store::Owner {
        tenant_id: "default".into(),
        user_id: "nobody".into(),
    };
    assert!(
        store
            .export_user(&owner)
            .await
            .unwrap()
            .conversations
            .is_empty()
    );
}

#[tokio::test]
async fn api_keys_tokens_and_their_secrets_never_reach_the_log_even_at_trace() {
    let upstream = FakeUpstream::start().await;
    upstream.set_default(openai_stream(&["ok"], Duration::ZERO));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spillway.toml");
    let config = format!(
        "{}\n[store]\ndata_dir = \"{}\"\n\n[auth]\nenabled = true\n\n[auth.jwt]\nhs256_secret_env = \"SPILLWAY_TEST_LOG_JWT_SECRET\"\n",
        openai_config(&upstream),
        dir.path().display()
    );
    std::fs::write(&path, config).unwrap();
    let jwt_secret = "jwt-secret-0123456789-abcdefghijklmnop-SECRET";
    let created = Command::new(BIN)
        .args(["keys", "create", "--tenant", "acme", "--config"])
        .arg(&path)
        .output()
        .await
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let key_secret = key.rsplit('_').next().unwrap().to_owned();
    assert_eq!(key_secret.len(), 64, "{key}");

    let process = Process::serve(
        &["--config", path.to_str().unwrap()],
        &[
            ("SPILLWAY_TEST_LOG_JWT_SECRET", jwt_secret),
            ("SPILLWAY_LOG_LEVEL", "trace"),
        ],
    )
    .await;
    let now = spillway::store::now_ms() / 1000;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": "ada", "exp": now + 600, "jti": "log-scan-jti" }),
        &jsonwebtoken::EncodingKey::from_secret(jwt_secret.as_bytes()),
    )
    .unwrap();
    let wrong_key = format!("sk_spl_0123456789abcdef_{}", "f".repeat(64));

    let mut body = chat_body("gpt-test", false);
    body["messages"][0]["content"] = "my private question about zebras".into();
    for credential in [&key, &token, &wrong_key] {
        let status = client()
            .post(process.url("/v1/chat/completions"))
            .bearer_auth(credential)
            .header("x-spillway-user", "ada")
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        let expected = if credential == &wrong_key { 401 } else { 200 };
        assert_eq!(status, expected, "{credential}");
    }
    // A token in the query string (EventSource, WebSocket upgrades).
    let status = client()
        .get(process.url(&format!(
            "/v1/generations/{}/events?access_token={token}",
            uuid::Uuid::now_v7()
        )))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16();
    assert_eq!(status, 204, "an unknown reply: nothing to resume");

    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = process.log.lock().unwrap().clone();
    assert!(
        log.contains("generation started"),
        "the requests were logged: {log}"
    );
    for (what, secret) in [
        ("the API key's secret", key_secret.as_str()),
        ("the JWT", token.as_str()),
        ("the JWT's signature", token.rsplit('.').next().unwrap()),
        ("the HS256 secret", jwt_secret),
        ("a wrong key's secret", &"f".repeat(64)),
    ] {
        assert!(!log.contains(secret), "{what} leaked into the log");
    }
    assert!(
        !log.contains("zebras"),
        "message content leaked into the log"
    );
}

/// `check-config --print` shows the effective configuration (file,
/// environment, defaults) as TOML, with passwords in URLs redacted.
#[tokio::test]
async fn check_config_prints_the_effective_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spillway.toml");
    std::fs::write(&path, "[server]\nshutdown_grace_secs = 42\n").unwrap();
    let out = Command::new(BIN)
        .args(["check-config", "--print"])
        .arg(&path)
        .env(
            "SPILLWAY_DATABASE_URL",
            "postgres://app:pg-very-secret@db/chat",
        )
        .env(
            "SPILLWAY_REDIS_URL",
            "redis://:redis-very-secret@cache:6379",
        )
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let all = format!("{printed}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains("pg-very-secret"), "{all}");
    assert!(!all.contains("redis-very-secret"), "{all}");
    let effective: toml::Value = toml::from_str(&printed).expect("TOML");
    assert_eq!(
        effective["server"]["shutdown_grace_secs"].as_integer(),
        Some(42)
    );
    assert_eq!(
        effective["store"]["database_url"].as_str(),
        Some("postgres://app:[redacted]@db/chat")
    );
    assert_eq!(
        effective["cluster"]["redis_url"].as_str(),
        Some("redis://:[redacted]@cache:6379")
    );
}
