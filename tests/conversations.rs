//! The history API over real sockets, against SQLite and PostgreSQL:
//! conversations, messages, pagination under inserts, ownership, export and
//! erasure, and OpenAI-compatible requests showing up as history.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Both databases: SQLite in a tempdir, and a fresh PostgreSQL database.
async fn gateways(upstream: &FakeUpstream) -> Vec<(String, TestGateway, Option<db::TestDatabase>)> {
    let sqlite = TestGateway::openai(upstream).await;
    let (database, url) = db::postgres_database().await;
    let mut config = test_config(&openai_config(upstream));
    config.store.database_url = Some(url);
    let dir = tempfile::tempdir().unwrap();
    config.store.data_dir = dir.path().display().to_string();
    let postgres = TestGateway::start_with(config).await;
    std::mem::forget(dir);
    vec![
        ("sqlite".into(), sqlite, None),
        ("postgres".into(), postgres, Some(database)),
    ]
}

async fn call(
    gateway: &TestGateway,
    method: reqwest::Method,
    path: &str,
    user: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = client().request(method, gateway.url(path));
    if let Some(user) = user {
        request = request.header("x-spillway-user", user);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn create(gateway: &TestGateway, user: &str, title: &str) -> String {
    let (status, body) = call(
        gateway,
        reqwest::Method::POST,
        "/v1/conversations",
        Some(user),
        Some(json!({ "title": title, "metadata": { "topic": "test" } })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn conversations_are_created_listed_renamed_and_deleted_per_user() {
    let upstream = FakeUpstream::start().await;
    for (backend, gateway, _db) in gateways(&upstream).await {
        let id = create(&gateway, "ada", "First").await;
        let (status, body) = call(
            &gateway,
            reqwest::Method::GET,
            &format!("/v1/conversations/{id}"),
            Some("ada"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{backend}");
        assert_eq!(body["title"], "First");
        assert_eq!(body["metadata"], json!({ "topic": "test" }));

        // Another user sees nothing: not found, never forbidden.
        for (method, path) in [
            (reqwest::Method::GET, format!("/v1/conversations/{id}")),
            (
                reqwest::Method::GET,
                format!("/v1/conversations/{id}/messages"),
            ),
            (reqwest::Method::DELETE, format!("/v1/conversations/{id}")),
        ] {
            let (status, body) = call(&gateway, method, &path, Some("mallory"), None).await;
            assert_eq!(status, 404, "{backend} {path}: {body}");
            assert_eq!(body["error"]["code"], "conversation_not_found");
        }
        let (status, body) = call(
            &gateway,
            reqwest::Method::PATCH,
            &format!("/v1/conversations/{id}"),
            Some("mallory"),
            Some(json!({ "title": "mine now" })),
        )
        .await;
        assert_eq!(status, 404, "{backend}: {body}");

        let (status, body) = call(
            &gateway,
            reqwest::Method::PATCH,
            &format!("/v1/conversations/{id}"),
            Some("ada"),
            Some(json!({ "title": "Renamed" })),
        )
        .await;
        assert_eq!(status, 200, "{backend}: {body}");
        assert_eq!(body["title"], "Renamed");

        let (status, _) = call(
            &gateway,
            reqwest::Method::DELETE,
            &format!("/v1/conversations/{id}"),
            Some("ada"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{backend}");
        let (status, _) = call(
            &gateway,
            reqwest::Method::GET,
            &format!("/v1/conversations/{id}"),
            Some("ada"),
            None,
        )
        .await;
        assert_eq!(status, 404, "{backend}");
    }
}

#[tokio::test]
async fn requests_without_a_user_or_with_bad_input_get_typed_errors() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::openai(&upstream).await;
    let (status, body) = call(
        &gateway,
        reqwest::Method::GET,
        "/v1/conversations",
        None,
        None,
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "missing_user");
    let (status, body) = call(
        &gateway,
        reqwest::Method::GET,
        "/v1/conversations?limit=0",
        Some("ada"),
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].clone()),
        (400, json!("limit"))
    );
    let (status, body) = call(
        &gateway,
        reqwest::Method::GET,
        "/v1/conversations?after=nope",
        Some("ada"),
        None,
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].clone()),
        (400, json!("after"))
    );
    let (status, body) = call(
        &gateway,
        reqwest::Method::POST,
        "/v1/conversations",
        Some("ada"),
        Some(json!({ "metadata": [1] })),
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].clone()),
        (400, json!("metadata"))
    );
    let (status, body) = call(
        &gateway,
        reqwest::Method::POST,
        "/v1/conversations",
        Some("ada"),
        Some(json!({ "title": "x".repeat(201) })),
    )
    .await;
    assert_eq!(
        (status, body["error"]["param"].clone()),
        (400, json!("title"))
    );
}

#[tokio::test]
async fn pages_have_no_duplicates_or_gaps_while_conversations_are_created() {
    let upstream = FakeUpstream::start().await;
    for (backend, gateway, _db) in gateways(&upstream).await {
        let mut before = Vec::new();
        for i in 0..7 {
            before.push(create(&gateway, "lin", &format!("c{i}")).await);
        }
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut inserted = 0;
        loop {
            let path = match &cursor {
                Some(after) => format!("/v1/conversations?limit=3&after={after}"),
                None => "/v1/conversations?limit=3".to_owned(),
            };
            let (status, body) =
                call(&gateway, reqwest::Method::GET, &path, Some("lin"), None).await;
            assert_eq!(status, 200, "{backend}");
            for item in body["data"].as_array().unwrap() {
                seen.push(item["id"].as_str().unwrap().to_owned());
            }
            // New conversations arrive between pages.
            create(&gateway, "lin", &format!("new{inserted}")).await;
            inserted += 1;
            match body["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{backend}: no duplicates");
        let mut expected = before.clone();
        expected.reverse(); // newest first
        assert_eq!(
            seen, expected,
            "{backend}: every conversation that existed, in order, no gaps"
        );
    }
}

#[tokio::test]
async fn openai_requests_are_stored_as_history_with_their_replies() {
    let upstream = FakeUpstream::start().await;
    for (backend, gateway, _db) in gateways(&upstream).await {
        upstream.push(openai_stream(&["Hello", " there"], Duration::ZERO));
        let mut body = chat_body("gpt-test", true);
        body["messages"] = json!([
            { "role": "system", "content": "Be nice." },
            { "role": "user", "content": "Hi!" }
        ]);
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .header("x-spillway-user", "kay")
            .json(&body)
            .send()
            .await
            .unwrap();
        let events = SseReader::new(response).collect().await;
        assert_eq!(content_of(&events), "Hello there");
        gateway.persister().flushed().await;

        let (_, list) = call(
            &gateway,
            reqwest::Method::GET,
            "/v1/conversations",
            Some("kay"),
            None,
        )
        .await;
        let conversations = list["data"].as_array().unwrap();
        assert_eq!(conversations.len(), 1, "{backend}: {list}");
        assert_eq!(conversations[0]["metadata"]["source"], "openai");
        let id = conversations[0]["id"].as_str().unwrap();
        let (_, messages) = call(
            &gateway,
            reqwest::Method::GET,
            &format!("/v1/conversations/{id}/messages"),
            Some("kay"),
            None,
        )
        .await;
        let messages = messages["data"].as_array().unwrap();
        assert_eq!(messages.len(), 2, "{backend}");
        assert_eq!(
            (
                messages[0]["role"].as_str(),
                messages[0]["content"].as_str()
            ),
            (Some("user"), Some("Hi!"))
        );
        let reply = &messages[1];
        assert_eq!(reply["role"], "assistant");
        assert_eq!(reply["content"], "Hello there");
        assert_eq!(reply["status"], "complete");
        assert_eq!(reply["model"], "fake-model");
        assert_eq!(reply["provider"], "fake");
        assert_eq!(reply["usage"]["prompt_tokens"], 7);
        assert_eq!(reply["usage"]["completion_tokens"], 2);
        assert_eq!(reply["usage"]["estimated"], false);
    }
}

#[tokio::test]
async fn failed_and_aborted_replies_are_stored_with_their_status() {
    let upstream = FakeUpstream::start().await;
    let gateway = TestGateway::openai(&upstream).await;
    // Cut mid-answer, no fallback: failed, with the partial text.
    upstream.push(Script::sse(vec![openai_text_chunk("partial")]));
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-spillway-user", "rob")
        .json(&chat_body("gpt-test", true))
        .send()
        .await
        .unwrap();
    let events = SseReader::new(response).collect().await;
    final_error(&events);
    // The client leaves mid-answer: aborted.
    let mut steps = vec![openai_text_chunk("going")];
    steps.push(Step::Sleep(Duration::from_secs(30)));
    upstream.push(Script::sse(steps));
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-spillway-user", "rob")
        .json(&chat_body("gpt-test", true))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    reader.until_content().await;
    drop(reader);
    upstream.wait_closed(2).await;

    let mut replies = Vec::new();
    for _ in 0..100 {
        gateway.persister().flushed().await;
        let export = gateway
            .store()
            .export_user(&spillway::store::Owner {
                tenant_id: "default".into(),
                user_id: "rob".into(),
            })
            .await
            .unwrap();
        replies = export
            .messages
            .into_iter()
            .filter(|m| m.role == "assistant")
            .collect::<Vec<_>>();
        if replies.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut statuses: Vec<(String, String)> = replies
        .iter()
        .map(|m| (m.status.as_str().to_owned(), m.content.clone()))
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        vec![
            ("aborted".to_owned(), "going".to_owned()),
            ("failed".to_owned(), "partial".to_owned())
        ]
    );
}

#[tokio::test]
async fn export_then_erase_removes_everything_of_one_user_only() {
    let upstream = FakeUpstream::start().await;
    for (backend, gateway, _db) in gateways(&upstream).await {
        upstream.push(openai_stream(&["answer"], Duration::ZERO));
        let response = client()
            .post(gateway.url("/v1/chat/completions"))
            .header("x-spillway-user", "eve")
            .json(&chat_body("gpt-test", true))
            .send()
            .await
            .unwrap();
        SseReader::new(response).collect().await;
        create(&gateway, "eve", "notes").await;
        let other = create(&gateway, "bob", "bob's").await;
        gateway.persister().flushed().await;

        let (status, export) = call(
            &gateway,
            reqwest::Method::GET,
            "/v1/me/export",
            Some("eve"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{backend}");
        assert_eq!(export["user"]["user_id"], "eve");
        assert_eq!(
            export["conversations"].as_array().unwrap().len(),
            2,
            "{backend}: {export}"
        );
        assert_eq!(export["messages"].as_array().unwrap().len(), 2);
        assert_eq!(export["usage"].as_array().unwrap().len(), 1);

        let (status, erased) = call(
            &gateway,
            reqwest::Method::DELETE,
            "/v1/me",
            Some("eve"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{backend}");
        assert_eq!(
            (
                erased["conversations"].as_u64(),
                erased["messages"].as_u64(),
                erased["usage_days"].as_u64()
            ),
            (Some(2), Some(2), Some(1)),
            "{backend}: {erased}"
        );
        let (_, export) = call(
            &gateway,
            reqwest::Method::GET,
            "/v1/me/export",
            Some("eve"),
            None,
        )
        .await;
        assert!(export["conversations"].as_array().unwrap().is_empty());
        assert!(export["messages"].as_array().unwrap().is_empty());
        // Bob is untouched.
        let (status, _) = call(
            &gateway,
            reqwest::Method::GET,
            &format!("/v1/conversations/{other}"),
            Some("bob"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{backend}");
    }
}
