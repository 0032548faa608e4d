//! The native SSE transport over real sockets, against the scriptable fake
//! upstream: `POST /v1/conversations/{id}/messages` streams the reply,
//! `GET /v1/generations/{id}/events` resumes it (`Last-Event-ID` or
//! `?from=&epoch=`) byte-exactly, `POST /v1/generations/{id}/cancel` stops
//! it and closes the upstream, bad input gets typed errors, and a client
//! that stops reading costs the upstream and other clients nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::future::Future;
use std::time::Duration;

use axum::body::Bytes;
use common::*;
use serde_json::{Value, json};

/// Upper bound on every wait in this file.
const WAIT: Duration = Duration::from_secs(30);

/// Awaits `future`, failing the test if it takes longer than [`WAIT`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// The fake-upstream gateway, with a generous grace period (a reply must
/// survive the gap between a disconnect and its resume) and `extra` config.
async fn gateway(upstream: &FakeUpstream, extra: &str) -> TestGateway {
    let toml = format!(
        "{}\n[generation]\ngrace_secs = 300\n{extra}\n",
        openai_config(upstream)
    );
    TestGateway::start(&toml).await
}

/// `POST /v1/conversations` for `user`; returns the new id.
async fn create_conversation(gateway: &TestGateway, user: &str) -> String {
    let response = within(
        "create a conversation",
        client()
            .post(gateway.url("/v1/conversations"))
            .header("x-spillway-user", user)
            .json(&json!({}))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = within("conversation body", response.json()).await.unwrap();
    body["id"].as_str().expect("conversation id").to_owned()
}

/// `POST /v1/conversations/{conversation}/messages` as `user`.
async fn post_message(
    gateway: &TestGateway,
    user: &str,
    conversation: &str,
    content: &str,
    client_message_id: &str,
) -> reqwest::Response {
    within(
        "send a message",
        client()
            .post(gateway.url(&format!("/v1/conversations/{conversation}/messages")))
            .header("x-spillway-user", user)
            .json(&json!({ "content": content, "client_message_id": client_message_id }))
            .send(),
    )
    .await
    .unwrap()
}

/// `GET /v1/generations/{generation}/events?user=<user><query>`, the way an
/// `EventSource` asks (no custom headers but `Last-Event-ID`).
async fn resume(
    gateway: &TestGateway,
    user: &str,
    generation: &str,
    last_event_id: Option<&[u8]>,
    query: &str,
) -> reqwest::Response {
    let mut request = client().get(gateway.url(&format!(
        "/v1/generations/{generation}/events?user={user}{query}"
    )));
    if let Some(id) = last_event_id {
        request = request.header(
            "last-event-id",
            reqwest::header::HeaderValue::from_bytes(id).unwrap(),
        );
    }
    within("resume", request.send()).await.unwrap()
}

/// `POST /v1/generations/{generation}/cancel` as `user`.
async fn cancel(gateway: &TestGateway, user: &str, generation: &str) -> reqwest::Response {
    within(
        "cancel",
        client()
            .post(gateway.url(&format!("/v1/generations/{generation}/cancel")))
            .header("x-spillway-user", user)
            .send(),
    )
    .await
    .unwrap()
}

/// The `error` object of a JSON error response, with its status.
async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = within("error body", response.text()).await.unwrap();
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("a JSON error body ({err}), got {status}: {text:?}"));
    (status, body["error"].clone())
}

/// One SSE event as a client sees it.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    /// `event:` (default `message`).
    name: String,
    /// `id:`, when the event set one.
    id: Option<String>,
    /// The `data:` lines, joined with `\n`.
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|err| panic!("event data is JSON ({err}): {:?}", self.data))
    }
}

/// A small incremental SSE parser over a reqwest body (LF, CR or CRLF line
/// ends; comments and unknown fields ignored; `id` is per event, not
/// carried over, so each event shows what it set itself).
struct EventReader {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl EventReader {
    fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200, "an SSE stream answers 200");
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            content_type.starts_with("text/event-stream"),
            "content-type {content_type}"
        );
        Self {
            response,
            buffer: Vec::new(),
        }
    }

    /// Index just past the first blank line in the buffer (the end of an
    /// event block), if there is one.
    fn block_end(&self) -> Option<usize> {
        let b = &self.buffer;
        (0..b.len()).find_map(|i| {
            let rest = &b[i..];
            if rest.starts_with(b"\r\n\r\n") {
                Some(i + 4)
            } else if rest.starts_with(b"\n\n") || rest.starts_with(b"\r\r") {
                Some(i + 2)
            } else {
                None
            }
        })
    }

    /// The next event, or `None` at the end of the body.
    async fn next(&mut self) -> Option<Event> {
        loop {
            while let Some(end) = self.block_end() {
                let block: Vec<u8> = self.buffer.drain(..end).collect();
                let block = std::str::from_utf8(&block).expect("UTF-8 event block");
                if let Some(event) = parse_block(block) {
                    return Some(event);
                }
            }
            let chunk = within("the next SSE chunk", self.response.chunk())
                .await
                .expect("body chunk");
            match chunk {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => {
                    assert!(
                        self.buffer.iter().all(|b| b.is_ascii_whitespace()),
                        "the body ended inside an event: {:?}",
                        String::from_utf8_lossy(&self.buffer)
                    );
                    return None;
                }
            }
        }
    }

    /// The next event, which must exist.
    async fn expect(&mut self) -> Event {
        self.next().await.expect("another event before the end")
    }

    /// Everything up to the end of the body (which must end after the
    /// terminal event).
    async fn collect(mut self) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

/// Parses one event block; `None` when it dispatches nothing (comments).
fn parse_block(block: &str) -> Option<Event> {
    let mut name = None;
    let mut id = None;
    let mut data: Option<String> = None;
    for line in block.split(['\n', '\r']).filter(|l| !l.is_empty()) {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => name = Some(value.to_owned()),
            "id" => id = Some(value.to_owned()),
            "data" => match &mut data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
    let data = data?;
    Some(Event {
        name: name.unwrap_or_else(|| "message".to_owned()),
        id,
        data,
    })
}

/// The concatenated text of the `delta` events.
fn text_of(events: &[Event]) -> String {
    events
        .iter()
        .filter(|e| e.name == "delta")
        .map(|e| e.json()["text"].as_str().expect("delta text").to_owned())
        .collect()
}

/// The id of the last event that set one.
fn last_id(events: &[Event]) -> String {
    events
        .iter()
        .rev()
        .find_map(|e| e.id.clone())
        .expect("an event with an id")
}

/// Reads the `ack` (after any comments) and returns its JSON.
async fn read_ack(reader: &mut EventReader) -> Value {
    let ack = reader.expect().await;
    assert_eq!(ack.name, "ack", "the first event is the ack: {ack:?}");
    assert_eq!(ack.id, None, "the ack is not a resume point");
    ack.json()
}

/// Reads events until the delta text so far is `text`.
async fn read_until_text(reader: &mut EventReader, text: &str) -> Vec<Event> {
    let mut events = Vec::new();
    while text_of(&events).len() < text.len() {
        events.push(reader.expect().await);
    }
    assert_eq!(text_of(&events), text);
    events
}

/// Checks that `events` (a stream starting at log offset `from`) carry
/// dense, contiguous `offset`/`next` values matching their `id:` lines.
fn check_ids(events: &[Event], generation: &str, epoch: u64, from: u64) -> u64 {
    let mut cursor = from;
    for event in events.iter().filter(|e| e.id.is_some()) {
        let json = event.json();
        assert_eq!(json["type"], event.name.as_str());
        assert_eq!(json["generation_id"], generation);
        assert_eq!(json["epoch"], epoch);
        let offset = json["offset"].as_u64().unwrap();
        let next = json["next"].as_u64().unwrap();
        // Text is contiguous; the log's `finish` event has no frame of its
        // own (its reason rides on `done`), so the frame after it starts
        // one further on.
        if event.name == "delta" {
            assert_eq!(offset, cursor, "no gap and no overlap: {event:?}");
        } else {
            assert!(
                offset == cursor || offset == cursor + 1,
                "no overlap: {event:?} after {cursor}"
            );
        }
        assert!(
            next > offset || event.name == "done",
            "an event advances: {event:?}"
        );
        assert_eq!(
            event.id.as_deref(),
            Some(format!("{generation}:{epoch}:{next}").as_str()),
            "id is <generation>:<epoch>:<next>"
        );
        cursor = next;
    }
    cursor
}

/// Lets every `Step::AwaitRelease` of `upstream` through, now and until the
/// returned task is aborted (a release sent before the fake reaches its
/// pause would otherwise be lost).
fn keep_releasing(upstream: &FakeUpstream) -> tokio::task::JoinHandle<()> {
    let upstream = upstream.clone();
    tokio::spawn(async move {
        loop {
            upstream.release();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// An OpenAI stream of `first`, a pause until released, then `rest`.
fn paused_stream(first: &[String], rest: &[String]) -> Script {
    let mut steps: Vec<Step> = first.iter().map(|t| openai_text_chunk(t)).collect();
    steps.push(Step::AwaitRelease);
    steps.extend(rest.iter().map(|t| openai_text_chunk(t)));
    steps.extend(openai_finish(7, (first.len() + rest.len()) as u64));
    Script::sse(steps)
}

fn strings(tokens: &[&str]) -> Vec<String> {
    tokens.iter().map(|t| (*t).to_owned()).collect()
}

const TOKENS: [&str; 9] = [
    "Hello",
    ",",
    " wörld",
    " — ",
    "日本語",
    " 🎉",
    "!\n",
    "line \"two\"",
    " \\end",
];

#[tokio::test]
async fn a_posted_message_streams_ack_deltas_usage_and_done() {
    let upstream = FakeUpstream::start().await;
    upstream.push(openai_stream(&TOKENS, Duration::from_millis(2)));
    let gateway = gateway(&upstream, "").await;
    let conversation = create_conversation(&gateway, "ada").await;

    let response = post_message(&gateway, "ada", &conversation, "Say hello", "c-1").await;
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    let mut reader = EventReader::new(response);

    let ack = read_ack(&mut reader).await;
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["client_message_id"], "c-1");
    assert_eq!(ack["conversation_id"], conversation.as_str());
    let message_id = ack["message_id"].as_str().expect("message_id");
    assert!(uuid::Uuid::parse_str(message_id).is_ok(), "{ack}");
    let generation = ack["generation_id"].as_str().expect("generation_id");
    assert!(uuid::Uuid::parse_str(generation).is_ok(), "{ack}");
    let epoch = ack["epoch"].as_u64().expect("epoch");

    let events = reader.collect().await;
    let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
    let deltas = names.iter().take_while(|n| **n == "delta").count();
    assert!(deltas >= 1, "{names:?}");
    assert_eq!(
        &names[deltas..],
        ["usage", "done"],
        "deltas, then usage, then done: {names:?}"
    );
    assert_eq!(text_of(&events), TOKENS.concat());
    let end = check_ids(&events, generation, epoch, 0);

    let usage = events[deltas].json();
    assert_eq!(usage["prompt_tokens"], 7);
    assert_eq!(usage["completion_tokens"], TOKENS.len());
    let done = events.last().unwrap().json();
    assert_eq!(done["finish_reason"], "stop");
    assert_eq!(done["offset"], end);
    assert_eq!(done["next"], end);

    // The upstream was asked once, with the user's message, and read to
    // its end.
    assert_eq!(upstream.requests().len(), 1);
    let closed = within("upstream closed", upstream.wait_closed(1)).await;
    assert!(closed[0].completed);
}

#[tokio::test]
async fn an_eventsource_resumes_from_last_event_id_or_from_and_epoch() {
    let upstream = FakeUpstream::start().await;
    let first = strings(&TOKENS[..4]);
    let rest = strings(&TOKENS[4..]);
    let full = TOKENS.concat();
    upstream.push(paused_stream(&first, &rest));
    upstream.push(paused_stream(&first, &rest));
    let gateway = gateway(&upstream, "").await;
    let conversation = create_conversation(&gateway, "ada").await;

    // Last-Event-ID, as a reconnecting EventSource sends it.
    let mut reader =
        EventReader::new(post_message(&gateway, "ada", &conversation, "hi", "c-1").await);
    let ack = read_ack(&mut reader).await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    let epoch = ack["epoch"].as_u64().unwrap();
    let before = read_until_text(&mut reader, &first.concat()).await;
    let cut = check_ids(&before, &generation, epoch, 0);
    let last = last_id(&before);
    drop(reader); // the page reloads

    let response = resume(&gateway, "ada", &generation, Some(last.as_bytes()), "").await;
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let releasing = keep_releasing(&upstream);
    let after = EventReader::new(response).collect().await;
    releasing.abort();
    assert!(after.iter().all(|e| e.name != "ack"), "{after:?}");
    assert_eq!(after.last().unwrap().name, "done", "{after:?}");
    check_ids(&after, &generation, epoch, cut);
    assert_eq!(text_of(&before) + &text_of(&after), full);

    // `?from=&epoch=`, for clients that track the offset themselves.
    let mut reader =
        EventReader::new(post_message(&gateway, "ada", &conversation, "again", "c-2").await);
    let ack = read_ack(&mut reader).await;
    let generation = ack["generation_id"].as_str().unwrap().to_owned();
    let before = read_until_text(&mut reader, &first.concat()).await;
    let cut = check_ids(&before, &generation, epoch, 0);
    drop(reader);

    let query = format!("&from={cut}&epoch={epoch}");
    let response = resume(&gateway, "ada", &generation, None, &query).await;
    let releasing = keep_releasing(&upstream);
    let after = EventReader::new(response).collect().await;
    releasing.abort();
    assert_eq!(after.last().unwrap().name, "done", "{after:?}");
    check_ids(&after, &generation, epoch, cut);
    assert_eq!(text_of(&before) + &text_of(&after), full);

    // Both replies ran to their end upstream: the gap cancelled nothing.
    let closed = within("upstreams closed", upstream.wait_closed(2)).await;
    assert!(closed.iter().all(|c| c.completed), "{closed:?}");
}

/// 40 tokens of at least 64 bytes each (multi-byte text included): with
/// `generation.max_frame_bytes = 64`, every delta event carries exactly one
/// token, so "after N events" is a deterministic cut point.
fn long_tokens() -> Vec<String> {
    (0..40)
        .map(|i| {
            let mut token = format!("‹{i:02}› žluťoučký kůň «日本» 🎉 \"q\" \\ ");
            while token.len() < 64 + i % 5 {
                token.push('·');
            }
            token
        })
        .collect()
}

#[tokio::test]
async fn resuming_from_any_event_id_is_byte_exact() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway(&upstream, "max_frame_bytes = 64").await;
    let tokens = long_tokens();
    let full = tokens.concat();

    // Disconnect while the reply is live, after N events, and resume from
    // the last event id received.
    for cut in [1, 5, 17, 39, 40] {
        upstream.push(paused_stream(&tokens[..cut], &tokens[cut..]));
        let conversation = create_conversation(&gateway, "ada").await;
        let response = post_message(&gateway, "ada", &conversation, "count", "c-1").await;
        let mut reader = EventReader::new(response);
        let ack = read_ack(&mut reader).await;
        let generation = ack["generation_id"].as_str().unwrap().to_owned();
        let epoch = ack["epoch"].as_u64().unwrap();
        let mut before = Vec::new();
        for _ in 0..cut {
            before.push(reader.expect().await);
        }
        assert!(
            before.iter().all(|e| e.name == "delta"),
            "cut {cut}: {before:?}"
        );
        assert_eq!(
            text_of(&before),
            tokens[..cut].concat(),
            "one token per event"
        );
        assert_eq!(check_ids(&before, &generation, epoch, 0), cut as u64);
        drop(reader);

        let last = last_id(&before);
        let response = resume(&gateway, "ada", &generation, Some(last.as_bytes()), "").await;
        let releasing = keep_releasing(&upstream);
        let after = EventReader::new(response).collect().await;
        releasing.abort();
        assert_eq!(after.last().unwrap().name, "done", "cut {cut}: {after:?}");
        check_ids(&after, &generation, epoch, cut as u64);
        assert_eq!(text_of(&before) + &text_of(&after), full, "cut {cut}");

        // And once it has finished: from every event id of the whole
        // stream (deltas, usage), the rest is exactly what follows it.
        if cut == 1 {
            let events: Vec<Event> = before.iter().chain(&after).cloned().collect();
            for (i, event) in events.iter().enumerate() {
                // (`usage` and `done` leave the client at the end of the
                // log, where a finished reply has nothing more: 204.)
                let Some(id) = &event.id else { continue };
                if event.name != "delta" {
                    continue;
                }
                let response = resume(&gateway, "ada", &generation, Some(id.as_bytes()), "").await;
                let rest = EventReader::new(response).collect().await;
                assert_eq!(rest.last().unwrap().name, "done", "from {id}: {rest:?}");
                assert_eq!(text_of(&events[..=i]) + &text_of(&rest), full, "from {id}");
            }
        }
    }
}

#[tokio::test]
async fn nothing_to_resume_is_204() {
    let upstream = FakeUpstream::start().await;
    upstream.push(openai_stream(&TOKENS, Duration::ZERO));
    let gateway = gateway(&upstream, "").await;
    let conversation = create_conversation(&gateway, "ada").await;

    // Generations nobody has.
    for unknown in ["0190c0de-0000-7000-8000-000000000000", "not-a-generation"] {
        let response = resume(&gateway, "ada", unknown, None, "").await;
        assert_eq!(response.status(), 204, "{unknown}");
    }

    let mut reader =
        EventReader::new(post_message(&gateway, "ada", &conversation, "hi", "c-1").await);
    let generation = read_ack(&mut reader).await["generation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let events = reader.collect().await;
    let done = events.last().unwrap();
    assert_eq!(done.name, "done");
    let end = done.json()["next"].as_u64().unwrap();
    let epoch = done.json()["epoch"].as_u64().unwrap();

    // A finished generation resumed at its end, by id or by offset.
    let done_id = done.id.clone().unwrap();
    let response = resume(&gateway, "ada", &generation, Some(done_id.as_bytes()), "").await;
    assert_eq!(response.status(), 204);
    let query = format!("&from={end}&epoch={epoch}");
    let response = resume(&gateway, "ada", &generation, None, &query).await;
    assert_eq!(response.status(), 204);

    // Another user has nothing to resume here either.
    let response = resume(&gateway, "bob", &generation, None, "").await;
    assert_eq!(response.status(), 204);

    // Before the end, there is something: the rest of the reply.
    let response = resume(&gateway, "ada", &generation, None, "&from=0").await;
    let replay = EventReader::new(response).collect().await;
    assert_eq!(text_of(&replay), TOKENS.concat());
}

#[tokio::test]
async fn a_wrong_epoch_or_offset_says_reload_and_a_malformed_id_is_400() {
    let upstream = FakeUpstream::start().await;
    upstream.push(openai_stream(&TOKENS, Duration::ZERO));
    upstream.push(openai_stream(&TOKENS, Duration::ZERO));
    let gateway = gateway(&upstream, "").await;
    let conversation = create_conversation(&gateway, "ada").await;

    let mut reader =
        EventReader::new(post_message(&gateway, "ada", &conversation, "hi", "c-1").await);
    let generation = read_ack(&mut reader).await["generation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let events = reader.collect().await;
    let done = events.last().unwrap().json();
    let end = done["next"].as_u64().unwrap();
    let epoch = done["epoch"].as_u64().unwrap();

    let reload = [
        (Some(format!("{generation}:{}:0", epoch + 1)), String::new()),
        (Some(format!("{generation}:{}:1", epoch - 1)), String::new()),
        (
            Some(format!("{generation}:{epoch}:{}", end + 1)),
            String::new(),
        ),
        (None, format!("&from={}&epoch={epoch}", end + 1)),
        (None, format!("&from=0&epoch={}", epoch + 7)),
        (None, format!("&from={}", u64::MAX)),
    ];
    for (last, query) in reload {
        let response = resume(
            &gateway,
            "ada",
            &generation,
            last.as_deref().map(str::as_bytes),
            &query,
        )
        .await;
        let events = EventReader::new(response).collect().await;
        assert_eq!(events.len(), 1, "{last:?} {query}: {events:?}");
        assert_eq!(events[0].name, "error");
        assert_eq!(events[0].id, None);
        let error = events[0].json();
        assert_eq!(error["code"], "reload_from_history", "{last:?} {query}");
        assert_eq!(error["retryable"], false);
        assert_eq!(error["generation_id"], generation.as_str());
    }

    let other = format!("0190c0de-0000-7000-8000-000000000000:{epoch}:0");
    let malformed: Vec<Vec<u8>> = vec![
        b"garbage".to_vec(),
        generation.clone().into_bytes(),
        format!("{generation}:{epoch}").into_bytes(),
        format!("{generation}:x:1").into_bytes(),
        format!("{generation}:{epoch}:-1").into_bytes(),
        format!("{generation}:{epoch}:1.5").into_bytes(),
        other.into_bytes(),
        b"\xff\xfe:1:2".to_vec(),
    ];
    for last in &malformed {
        let response = resume(&gateway, "ada", &generation, Some(last), "").await;
        let (status, error) = error_of(response).await;
        let shown = String::from_utf8_lossy(last);
        assert_eq!(status, 400, "{shown:?}: {error}");
        assert_eq!(error["code"], "invalid_value", "{shown:?}");
        assert_eq!(error["param"], "Last-Event-ID", "{shown:?}");
    }

    // Malformed query values are typed 400s too.
    for query in ["&from=abc", "&from=-1", "&epoch=x"] {
        let response = resume(&gateway, "ada", &generation, None, query).await;
        let (status, error) = error_of(response).await;
        assert_eq!(status, 400, "{query}: {error}");
        assert_eq!(error["type"], "invalid_request_error", "{query}");
    }

    // None of it disturbed a stream that is running.
    let mut reader =
        EventReader::new(post_message(&gateway, "ada", &conversation, "more", "c-2").await);
    read_ack(&mut reader).await;
    assert_eq!(text_of(&reader.collect().await), TOKENS.concat());
}

#[tokio::test]
async fn cancel_ends_the_stream_and_closes_the_upstream() {
    let upstream = FakeUpstream::start().await;
    let first = strings(&["Hel", "lo"]);
    let rest = strings(&[" never", " sent"]);
    upstream.push(paused_stream(&first, &rest));
    let gateway = gateway(&upstream, "").await;
    let conversation = create_conversation(&gateway, "ada").await;

    let mut reader =
        EventReader::new(post_message(&gateway, "ada", &conversation, "hi", "c-1").await);
    let generation = read_ack(&mut reader).await["generation_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = read_until_text(&mut reader, "Hello").await;

    // Only the owner can cancel; anyone else gets "not found".
    let (status, error) = error_of(cancel(&gateway, "bob", &generation).await).await;
    assert_eq!(status, 404);
    assert_eq!(error["code"], "generation_not_found");
    let (status, _) =
        error_of(cancel(&gateway, "ada", "0190c0de-0000-7000-8000-000000000000").await).await;
    assert_eq!(status, 404);
    let no_user = within(
        "cancel without a user",
        client()
            .post(gateway.url(&format!("/v1/generations/{generation}/cancel")))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(no_user.status(), 401);
    assert!(upstream.closed().is_empty(), "nothing was cancelled yet");

    let response = cancel(&gateway, "ada", &generation).await;
    assert_eq!(response.status(), 202);

    let events = reader.collect().await;
    assert_eq!(text_of(&events), "", "nothing after the cancel: {events:?}");
    let last = events.last().expect("a terminal event");
    assert_eq!(last.name, "error", "{events:?}");
    assert!(events.iter().all(|e| e.name != "done"), "{events:?}");
    let error = last.json();
    assert_eq!(error["code"], "cancelled");
    assert_eq!(error["generation_id"], generation.as_str());

    // The provider's connection was closed before its script ran out.
    let closed = within("upstream closed", upstream.wait_closed(1)).await;
    assert!(!closed[0].completed, "{closed:?}");

    // The reply is over: nothing to resume after the last delta.
    let last = last_id(&before);
    let response = resume(&gateway, "ada", &generation, Some(last.as_bytes()), "").await;
    assert_eq!(response.status(), 204);
}

#[tokio::test]
async fn bad_input_gets_typed_errors() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway(&upstream, "").await;
    let mine = create_conversation(&gateway, "ada").await;
    let theirs = create_conversation(&gateway, "bob").await;
    let url = gateway.url(&format!("/v1/conversations/{mine}/messages"));

    let send = |body: Bytes, user: Option<&'static str>| {
        let mut request = client()
            .post(url.clone())
            .header("content-type", "application/json")
            .body(body);
        if let Some(user) = user {
            request = request.header("x-spillway-user", user);
        }
        async move { within("send", request.send()).await.unwrap() }
    };

    let (status, error) = error_of(send(Bytes::from_static(b"{not json"), Some("ada")).await).await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], "invalid_json");

    let (status, error) =
        error_of(send(Bytes::from_static(br#"{"content":"hi"}"#), Some("ada")).await).await;
    assert_eq!(status, 400, "{error}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("client_message_id"),
        "{error}"
    );

    let (status, error) = error_of(
        send(
            Bytes::from_static(br#"{"content":"  ","client_message_id":"c-1"}"#),
            Some("ada"),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "empty content: {error}");

    let (status, error) = error_of(
        send(
            Bytes::from_static(br#"{"content":"hi","client_message_id":"c-1"}"#),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(error["code"], "missing_user");

    for conversation in [
        theirs.as_str(),
        "0190c0de-0000-7000-8000-000000000000",
        "nope",
    ] {
        let response = post_message(&gateway, "ada", conversation, "hi", "c-1").await;
        let (status, error) = error_of(response).await;
        assert_eq!(status, 404, "{conversation}");
        assert_eq!(error["code"], "conversation_not_found", "{conversation}");
    }

    // The owner of that conversation is unaffected and nothing went
    // upstream.
    assert!(upstream.requests().is_empty());
    upstream.push(openai_stream(&TOKENS, Duration::ZERO));
    let mut reader = EventReader::new(post_message(&gateway, "bob", &theirs, "hi", "c-1").await);
    read_ack(&mut reader).await;
    assert_eq!(text_of(&reader.collect().await), TOKENS.concat());
}

#[tokio::test]
async fn a_client_that_stops_reading_costs_the_upstream_and_others_nothing() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway(&upstream, &format!("max_reply_bytes = {}", 8 << 20)).await;

    // 2 MiB of text in 1 KiB chunks, then a pause, then a tail.
    let chunks: Vec<String> = (0..2048)
        .map(|i| {
            let mut chunk = format!("<{i:04}>");
            while chunk.len() < 1024 {
                chunk.push(char::from(b'a' + (chunk.len() % 26) as u8));
            }
            chunk
        })
        .collect();
    let tail = strings(&[" — the end"]);
    let big = chunks.concat() + &tail.concat();
    upstream.push(paused_stream(&chunks, &tail));

    let slow_conversation = create_conversation(&gateway, "ada").await;
    let mut slow =
        EventReader::new(post_message(&gateway, "ada", &slow_conversation, "long", "c-1").await);
    let ack = read_ack(&mut slow).await;
    let generation_id = ack["generation_id"].as_str().unwrap().to_owned();
    // From here the slow client reads nothing until the end of the test.

    within("the slow reply's upstream request", async {
        while upstream.requests().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;

    // Another client, another conversation: its reply streams while the
    // slow client's reply is live and unread.
    upstream.push(openai_stream(&TOKENS, Duration::ZERO));
    let other_conversation = create_conversation(&gateway, "bob").await;
    let mut other =
        EventReader::new(post_message(&gateway, "bob", &other_conversation, "hi", "c-1").await);
    read_ack(&mut other).await;
    let other_events = other.collect().await;
    assert_eq!(other_events.last().unwrap().name, "done");
    assert_eq!(text_of(&other_events), TOKENS.concat());

    let generation = gateway
        .gateway
        .generations
        .get(uuid::Uuid::parse_str(&generation_id).unwrap())
        .expect("the slow reply is held");
    assert!(
        generation.outcome().is_none(),
        "the slow reply is still live"
    );

    // The whole upstream reply is read while the client still reads
    // nothing.
    let releasing = keep_releasing(&upstream);
    let closed = within("both upstream bodies end", upstream.wait_closed(2)).await;
    releasing.abort();
    assert!(
        closed.iter().all(|c| c.completed),
        "both upstreams ran to the end: {closed:?}"
    );
    within("the slow reply ends", async {
        while generation.outcome().is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(generation.reply().text, big);

    // The slow client picks up again and gets every byte, once.
    let events = slow.collect().await;
    assert_eq!(events.last().unwrap().name, "done");
    let epoch = ack["epoch"].as_u64().unwrap();
    check_ids(&events, &generation_id, epoch, 0);
    let text = text_of(&events);
    assert_eq!(text.len(), big.len());
    assert!(text == big, "the slow client's text is byte-exact");
}

#[tokio::test]
async fn concurrent_sends_cannot_slip_past_the_per_user_limit() {
    let upstream = FakeUpstream::start().await;
    // Every reply holds until released, so they stay running.
    let mut steps = vec![openai_text_chunk("held")];
    steps.push(Step::AwaitRelease);
    steps.extend(openai_finish(1, 1));
    upstream.set_default(Script::sse(steps));
    let gateway = gateway(&upstream, "[chat]\nmax_generations_per_user = 1\n").await;
    let mut conversations = Vec::new();
    for _ in 0..6 {
        conversations.push(create_conversation(&gateway, "racer").await);
    }
    let sends = conversations.iter().enumerate().map(|(i, conversation)| {
        let gateway = &gateway;
        async move {
            post_message(gateway, "racer", conversation, "go", &format!("race-{i}"))
                .await
                .status()
                .as_u16()
        }
    });
    let mut statuses = futures_util::future::join_all(sends).await;
    statuses.sort_unstable();
    assert_eq!(
        statuses,
        vec![200, 429, 429, 429, 429, 429],
        "exactly one reply runs"
    );
    upstream.release();
}

#[tokio::test]
async fn a_nul_character_in_a_message_is_refused_before_it_can_block_storage() {
    let upstream = FakeUpstream::start().await;
    let gateway = gateway(&upstream, "").await;
    let conversation = create_conversation(&gateway, "nul").await;
    let response = post_message(&gateway, "nul", &conversation, "bad\u{0}byte", "n-1").await;
    let (status, error) = error_of(response).await;
    assert_eq!(status, 400);
    assert_eq!(error["code"], "invalid_frame");
    assert!(upstream.requests().is_empty());
}

#[tokio::test]
async fn two_racing_sends_of_one_message_start_one_reply() {
    let upstream = FakeUpstream::start().await;
    upstream.set_default(openai_stream(&["once"], Duration::ZERO));
    let gateway = gateway(&upstream, "").await;
    let conversation = create_conversation(&gateway, "twin").await;
    for round in 0..5 {
        let id = format!("same-{round}");
        let (a, b) = tokio::join!(
            post_message(&gateway, "twin", &conversation, "hello", &id),
            post_message(&gateway, "twin", &conversation, "hello", &id),
        );
        let mut generations = Vec::new();
        for response in [a, b] {
            match response.status().as_u16() {
                200 => {
                    let text = within("stream", response.text()).await.unwrap();
                    let ack = text
                        .split("\n\n")
                        .find(|block| block.contains("event: ack"))
                        .expect("an ack event");
                    let data = ack.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                    let ack: Value = serde_json::from_str(data).unwrap();
                    generations.push(ack["generation_id"].as_str().unwrap().to_owned());
                }
                409 => {
                    let (_, error) = error_of(response).await;
                    assert_eq!(error["code"], "send_in_progress");
                    assert_eq!(error["retryable"], true);
                }
                other => panic!("unexpected status {other}"),
            }
        }
        generations.dedup();
        assert_eq!(generations.len(), 1, "round {round}: one reply");
    }
    assert_eq!(
        upstream.requests().len(),
        5,
        "one upstream request per message"
    );
}
