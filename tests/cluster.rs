//! Several gateway processes behaving as one through Redis: messages,
//! replies, typing and presence reach a user's devices on other instances,
//! and a reply is resumed byte-exact on an instance that did not produce
//! it. Each test starts real `spillway serve` processes sharing a fresh
//! PostgreSQL database, a Redis server of its own and one fake upstream
//! (tests/common/cluster.rs). Without Redis, each instance stays alone.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use common::cluster::*;
use common::openai_stream;
use serde_json::{Value, json};

/// The upstream's pace between tokens.
const PACE: Duration = Duration::from_millis(3);

fn generation_of(ack: &Value) -> (String, u64) {
    (
        ack["generation_id"].as_str().unwrap().to_owned(),
        ack["epoch"].as_u64().unwrap(),
    )
}

/// Asserts that every frame in `frames` is a `presence` frame (room events
/// that may interleave anywhere).
fn only_presence(frames: &[Value], what: &str) {
    assert!(
        frames.iter().all(|f| f["type"] == "presence"),
        "{what}: unexpected frames {frames:#?}"
    );
}

/// Asserts the `message` frame a device gets for another device's send.
fn assert_message(message: &Value, conversation: &str, ack: &Value, content: &str) {
    assert_eq!(message["type"], "message", "{message}");
    assert_eq!(message["conversation_id"], conversation);
    assert_eq!(message["message"]["id"], ack["message_id"]);
    assert_eq!(message["message"]["conversation_id"], conversation);
    assert_eq!(message["message"]["role"], "user");
    assert_eq!(message["message"]["content"], content);
    assert_eq!(
        message["message"]["client_message_id"],
        ack["client_message_id"]
    );
}

/// The `usage` frame's token counts (its offsets depend on how a reader's
/// frames were coalesced).
fn usage_of(streamed: &Streamed) -> (Value, Value) {
    let usage = streamed
        .frames
        .iter()
        .find(|f| f["type"] == "usage")
        .unwrap_or_else(|| panic!("a usage frame: {:?}", streamed.kinds()));
    (
        usage["prompt_tokens"].clone(),
        usage["completion_tokens"].clone(),
    )
}

#[tokio::test]
async fn a_message_sent_on_a_reaches_the_users_device_on_b_which_streams_the_same_reply() {
    let cluster = Cluster::start(&["a", "b"], ClusterSettings::default()).await;
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let tokens = long_reply(40);
    let whole = tokens.concat();
    cluster.upstream.push(openai_stream(&refs(&tokens), PACE));
    let conversation = a.conversation("u").await;

    // B1 is in the conversation; A1 (another device of the same user, on
    // another instance) sends.
    let mut b1 = b.ws("u").await;
    assert_eq!(
        b1.subscribe(&conversation).await,
        presence(&conversation, "snapshot", "u", 1)
    );
    let mut a1 = a.ws("u").await;
    let (ack, _) = a1
        .send_message(&conversation, "Hello from instance A", "a-1")
        .await;
    let (generation, epoch) = generation_of(&ack);

    // On B: the stored message, then the reply announcement (A1 joining
    // the room may interleave as presence).
    let (message, before) = b1
        .until(WAIT, "the message sent on A", |f| f["type"] == "message")
        .await;
    only_presence(&before, "before the message on B1");
    assert_message(&message, &conversation, &ack, "Hello from instance A");
    let (reply, before) = b1.until_reply(&generation).await;
    only_presence(&before, "between the message and the reply on B1");
    assert_eq!(
        reply,
        json!({ "type": "reply", "conversation_id": conversation,
                "generation_id": generation, "epoch": epoch })
    );
    let (reply_on_a, before) = a1.until_reply(&generation).await;
    assert_eq!(reply_on_a, reply);
    assert!(
        before.iter().all(|f| f["type"] != "message"),
        "the sender gets no message of its own: {before:?}"
    );

    // Both devices stream the whole reply; the same text, the same end.
    let (on_a, on_b) = tokio::join!(a1.stream(&generation, 0), b1.stream(&generation, 0));
    assert_eq!(on_a.text, whole, "A1 streams the reply exactly");
    assert_eq!(on_b.text, whole, "B1 streams the reply exactly");
    assert_eq!(on_a.last()["type"], "done", "{:?}", on_a.last());
    assert_eq!(on_b.last(), on_a.last(), "the same done frame on both");
    assert_eq!(on_a.last()["finish_reason"], "stop");
    assert_eq!(usage_of(&on_b), usage_of(&on_a));
    assert_eq!(usage_of(&on_a), (json!(7), json!(tokens.len())));
    for frame in on_a.frames.iter().chain(&on_b.frames) {
        assert_eq!(frame["epoch"].as_u64(), Some(epoch), "{frame}");
    }
    for other in on_a.others.iter().chain(&on_b.others) {
        assert_eq!(other["type"], "presence", "nothing else meanwhile: {other}");
    }
    a1.ping(1).await;
    only_presence(&b1.ping(2).await, "after the reply on B1");
}

#[tokio::test]
async fn typing_and_presence_cross_instances_counting_devices_everywhere() {
    let cluster = Cluster::start(&["a", "b"], ClusterSettings::default()).await;
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let conversation = a.conversation("u").await;

    let mut b1 = b.ws("u").await;
    assert_eq!(
        b1.subscribe(&conversation).await,
        presence(&conversation, "snapshot", "u", 1)
    );
    // A1 joins on the other instance: its snapshot counts B1's device, and
    // B1 hears it join.
    let mut a1 = a.ws("u").await;
    a1.send(json!({ "type": "subscribe", "conversation_id": conversation }))
        .await;
    assert_eq!(
        a1.recv().await,
        presence(&conversation, "snapshot", "u", 2),
        "A1's snapshot counts the device on B"
    );
    assert_eq!(
        b1.recv().await,
        presence(&conversation, "join", "u", 2),
        "B1 hears A1 join"
    );

    // Typing crosses instances, never back to the sender.
    a1.send(json!({ "type": "typing", "conversation_id": conversation, "typing": true }))
        .await;
    assert_eq!(
        b1.recv().await,
        json!({ "type": "typing", "conversation_id": conversation, "user_id": "u", "typing": true })
    );
    b1.send(json!({ "type": "typing", "conversation_id": conversation, "typing": false }))
        .await;
    // A1's next frame is B1's typing: it never got its own.
    assert_eq!(
        a1.recv().await,
        json!({ "type": "typing", "conversation_id": conversation, "user_id": "u", "typing": false })
    );
    b1.assert_usable(1).await;
    a1.assert_usable(2).await;

    // A1 leaves: B1 hears it, with one device left.
    a1.close().await;
    assert_eq!(
        b1.recv().await,
        presence(&conversation, "leave", "u", 1),
        "B1 hears A1 leave"
    );
    b1.assert_usable(3).await;
    // A new device on A sees only B1 besides itself.
    let mut a2 = a.ws("u").await;
    assert_eq!(
        a2.subscribe(&conversation).await,
        presence(&conversation, "snapshot", "u", 2)
    );
    assert_eq!(b1.recv().await, presence(&conversation, "join", "u", 2));
}

#[tokio::test]
async fn a_reply_cut_on_a_at_a_random_offset_resumes_on_b_byte_exact() {
    let cluster = Cluster::start(&["a", "b"], ClusterSettings::default()).await;
    let mut rng = fastrand::Rng::with_seed(seed("cross_instance_resume"));
    let tokens = long_reply(60);
    let whole = tokens.concat();
    let conversation = cluster.node("a").conversation("u").await;

    // Each way round, and once more: the producer streams to its device,
    // which disconnects mid-reply; a new connection on the other instance
    // resumes at the offset it got to.
    for (round, (from, to)) in [("a", "b"), ("b", "a"), ("a", "b")].into_iter().enumerate() {
        cluster
            .upstream
            .push(openai_stream(&refs(&tokens), Duration::from_millis(15)));
        let mut device = cluster.node(from).ws("u").await;
        let (ack, _) = device
            .send_message(&conversation, "Tell me a long story", &format!("r-{round}"))
            .await;
        let (generation, epoch) = generation_of(&ack);
        device.until_reply(&generation).await;
        let target = rng.u64(1..56);
        let mut before = Streamed::at(0);
        let ended = device
            .continue_stream(&generation, &mut before, WAIT, |s| s.next >= target)
            .await;
        assert!(!ended, "round {round}: cut before the end");
        let cut = before.next;
        eprintln!("round {round}: {from} -> {to}, target offset {target}, cut at {cut}");
        // One log event per token: the offsets mean the same everywhere.
        assert_eq!(before.text, tokens[..cut as usize].concat());
        drop(device);

        let mut resumer = cluster.node(to).ws("u").await;
        resumer.resume(&generation, epoch, cut).await;
        let rest = resumer.stream(&generation, cut).await;
        assert_eq!(
            rest.first()["offset"].as_u64(),
            Some(cut),
            "round {round}: the first resumed frame starts at the requested offset"
        );
        assert_eq!(
            before.text.clone() + &rest.text,
            whole,
            "round {round}: cut at {cut} on {from}, resumed on {to}: byte-exact"
        );
        assert_eq!(
            rest.last()["type"],
            "done",
            "round {round}: {:?}",
            rest.last()
        );
        assert_eq!(rest.last()["finish_reason"], "stop");
        for frame in &rest.frames {
            assert_eq!(frame["epoch"].as_u64(), Some(epoch), "{frame}");
        }
        assert!(rest.others.is_empty(), "{:?}", rest.others);
        resumer.assert_usable(round as u64).await;
    }
}

#[tokio::test]
async fn a_finished_reply_resumes_on_b_from_any_offset_byte_exact() {
    let cluster = Cluster::start(&["a", "b"], ClusterSettings::default()).await;
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let mut rng = fastrand::Rng::with_seed(seed("finished_resume"));
    let tokens = long_reply(40);
    let whole = tokens.concat();
    cluster
        .upstream
        .push(openai_stream(&refs(&tokens), Duration::ZERO));
    let conversation = a.conversation("u").await;

    let mut a1 = a.ws("u").await;
    let (ack, _) = a1.send_message(&conversation, "Story", "f-1").await;
    let (generation, epoch) = generation_of(&ack);
    a1.until_reply(&generation).await;
    let full = a1.stream(&generation, 0).await;
    assert_eq!(full.text, whole);
    assert_eq!(full.last()["type"], "done");
    let end = full.next;
    assert!(end > tokens.len() as u64, "the finish takes offsets too");

    // From the start, from a random middle offset, right after the last
    // token, and at the very end (just the done frame).
    let middle = rng.u64(1..tokens.len() as u64);
    eprintln!("middle offset {middle}, end {end}");
    let mut b2 = b.ws("u").await;
    for offset in [0, middle, tokens.len() as u64, end] {
        b2.resume(&generation, epoch, offset).await;
        let rest = b2.stream(&generation, offset).await;
        let before = tokens[..(offset as usize).min(tokens.len())].concat();
        assert_eq!(before + &rest.text, whole, "resumed on B at {offset}");
        assert_eq!(rest.first()["offset"].as_u64(), Some(offset));
        assert_eq!(rest.last(), full.last(), "the same done frame, at {offset}");
        if offset == end {
            assert_eq!(rest.kinds(), ["done"]);
        }
    }
    b2.assert_usable(1).await;
}

#[tokio::test]
async fn bad_resumes_on_another_instance_say_reload_from_history() {
    let cluster = Cluster::start(&["a", "b"], ClusterSettings::default()).await;
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    cluster
        .upstream
        .push(openai_stream(&["a", "b"], Duration::ZERO));
    let conversation = a.conversation("u").await;
    let mut a1 = a.ws("u").await;
    let (ack, _) = a1.send_message(&conversation, "Hi", "x-1").await;
    let (generation, epoch) = generation_of(&ack);
    a1.until_reply(&generation).await;
    let full = a1.stream(&generation, 0).await;
    assert_eq!(full.text, "ab");

    let unknown = uuid::Uuid::now_v7().to_string();
    let cases = [
        ("unknown generation", unknown.as_str(), epoch, 0),
        ("wrong epoch", generation.as_str(), epoch + 1, 0),
        (
            "offset beyond the reply",
            generation.as_str(),
            epoch,
            full.next + 1,
        ),
    ];
    let mut b2 = b.ws("u").await;
    for (i, (case, id, epoch, offset)) in cases.into_iter().enumerate() {
        b2.resume(id, epoch, offset).await;
        let error = b2.recv().await;
        assert_eq!(error["type"], "error", "{case}: {error}");
        assert_eq!(error["code"], "reload_from_history", "{case}: {error}");
        assert_eq!(error["generation_id"], id, "{case}");
        assert_eq!(error["retryable"], false, "{case}");
        b2.assert_usable(i as u64).await;
    }

    // Another user cannot resume u's reply from any instance.
    let mut eve = b.ws("eve").await;
    eve.resume(&generation, epoch, 0).await;
    let error = eve.recv().await;
    assert_eq!(error["code"], "reload_from_history", "{error}");
    assert_eq!(error["generation_id"], generation);

    // And the right epoch on the same connection works.
    b2.resume(&generation, epoch, 0).await;
    let resumed = b2.stream(&generation, 0).await;
    assert_eq!(resumed.text, "ab");
    assert_eq!(resumed.last(), full.last());
}

#[tokio::test]
async fn without_redis_each_instance_is_alone_and_a_resume_elsewhere_reloads_from_history() {
    let cluster = Cluster::start_without_redis(&["a", "b"]).await;
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    cluster
        .upstream
        .push(openai_stream(&["only ", "on ", "A"], PACE));
    let conversation = a.conversation("u").await;

    // Both instances read the same database: B accepts the conversation.
    let mut b1 = b.ws("u").await;
    assert_eq!(
        b1.subscribe(&conversation).await,
        presence(&conversation, "snapshot", "u", 1)
    );
    let mut a1 = a.ws("u").await;
    // A's snapshot knows nothing of B1.
    assert_eq!(
        a1.subscribe(&conversation).await,
        presence(&conversation, "snapshot", "u", 1)
    );
    let (ack, _) = a1.send_message(&conversation, "Hi", "s-1").await;
    let (generation, epoch) = generation_of(&ack);
    a1.until_reply(&generation).await;
    let full = a1.stream(&generation, 0).await;
    assert_eq!(full.text, "only on A");

    // B1 got nothing of it (had anything been sent, it would be queued
    // before the pong), and B cannot resume it.
    let before = b1.ping(1).await;
    assert!(before.is_empty(), "B1 is alone on B: {before:?}");
    let mut b2 = b.ws("u").await;
    b2.resume(&generation, epoch, 0).await;
    let error = b2.recv().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["code"], "reload_from_history", "{error}");
    assert_eq!(error["generation_id"], generation);

    // Ready, with no Redis to check.
    let (status, body) = b.readyz().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ready", "{body}");
    assert_ne!(body["checks"]["redis"]["configured"], true, "{body}");
}

#[tokio::test]
async fn a_message_sent_on_a_reaches_subscribers_on_b_and_c() {
    let cluster = Cluster::start(&["a", "b", "c"], ClusterSettings::default()).await;
    let (a, b, c) = (cluster.node("a"), cluster.node("b"), cluster.node("c"));
    let tokens = long_reply(20);
    let whole = tokens.concat();
    cluster.upstream.push(openai_stream(&refs(&tokens), PACE));
    let conversation = b.conversation("u").await;

    let mut b1 = b.ws("u").await;
    assert_eq!(
        b1.subscribe(&conversation).await,
        presence(&conversation, "snapshot", "u", 1)
    );
    let mut c1 = c.ws("u").await;
    assert_eq!(
        c1.subscribe(&conversation).await,
        presence(&conversation, "snapshot", "u", 2)
    );
    assert_eq!(b1.recv().await, presence(&conversation, "join", "u", 2));

    let mut a1 = a.ws("u").await;
    let (ack, _) = a1
        .send_message(&conversation, "To every instance", "t-1")
        .await;
    let (generation, _) = generation_of(&ack);
    for (name, device) in [("B1", &mut b1), ("C1", &mut c1)] {
        let (message, before) = device
            .until(WAIT, "the message sent on A", |f| f["type"] == "message")
            .await;
        only_presence(&before, name);
        assert_message(&message, &conversation, &ack, "To every instance");
        let (_, before) = device.until_reply(&generation).await;
        only_presence(&before, name);
    }
    a1.until_reply(&generation).await;
    let (on_a, on_b, on_c) = tokio::join!(
        a1.stream(&generation, 0),
        b1.stream(&generation, 0),
        c1.stream(&generation, 0)
    );
    for (name, streamed) in [("A1", &on_a), ("B1", &on_b), ("C1", &on_c)] {
        assert_eq!(streamed.text, whole, "{name}");
        assert_eq!(streamed.last(), on_a.last(), "{name}: the same done");
    }
    assert_eq!(on_a.last()["type"], "done");
}

/// `GET /v1/me/generations` on `node` as `user`: the running replies.
async fn active(node: &Node, user: &str) -> Vec<Value> {
    let response = common::client()
        .get(node.url("/v1/me/generations"))
        .header("x-spillway-user", user)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    body["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn sessions_running_replies_resends_and_cancels_work_from_any_instance() {
    let cluster = Cluster::start(&["a", "b"], ClusterSettings::default()).await;
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let conversation = a.conversation("u").await;
    let tokens = long_reply(6);
    cluster.upstream.push(stalling_stream(&tokens, &[], PACE));

    // A session opened on A, subscribed to the conversation.
    let mut a1 = a.ws("u").await;
    assert_eq!(a1.hello["node"], "a");
    let session = a1.hello["session_id"].as_str().unwrap().to_owned();
    a1.subscribe(&conversation).await;
    let (ack, _) = a1.send_message(&conversation, "Long one", "s-1").await;
    let (generation, epoch) = generation_of(&ack);
    a1.until_reply(&generation).await;
    let mut streamed = Streamed::at(0);
    let ended = a1
        .continue_stream(&generation, &mut streamed, WAIT, |s| {
            s.text == tokens.concat()
        })
        .await;
    assert!(!ended, "the reply stalls, it does not end");
    assert_eq!(streamed.text, tokens.concat());

    // B lists the reply running on A, with what a resume needs.
    let listed = active(b, "u").await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["generation_id"], generation);
    assert_eq!(listed[0]["conversation_id"], conversation);
    assert_eq!(listed[0]["epoch"], epoch);
    assert_eq!(listed[0]["node"], "a");
    assert!(
        active(b, "eve").await.is_empty(),
        "another user sees nothing"
    );

    // The device drops and reconnects to B with its session: restored, and
    // the conversation is subscribed again there.
    a1.close().await;
    let path = format!("/v1/ws?session={session}");
    let mut b1 = WsClient::connect_path(b.addr(), &path, "u").await;
    assert_eq!(b1.hello["session_id"], session);
    assert_eq!(b1.hello["restored"], true);
    assert_eq!(b1.hello["node"], "b");
    let snapshot = b1.recv().await;
    assert_eq!(snapshot["type"], "presence", "{snapshot}");
    assert_eq!(snapshot["event"], "snapshot");
    assert_eq!(snapshot["conversation_id"], conversation);

    // A resend of the same message on B is answered with the first ack:
    // no second message, no second reply.
    let (again, _) = b1.send_message(&conversation, "Long one", "s-1").await;
    assert_eq!(again["message_id"], ack["message_id"]);
    assert_eq!(again["generation_id"], ack["generation_id"]);
    assert_eq!(cluster.upstream.requests().len(), 1, "one upstream call");

    // Cancelling on B stops the reply on A: B's reader ends `cancelled`.
    b1.resume(&generation, epoch, tokens.len() as u64).await;
    b1.send(json!({ "type": "cancel", "generation_id": generation }))
        .await;
    let (end, _) = b1
        .until(WAIT, "the cancelled end", |f| {
            f["type"] == "error" && f["generation_id"] == generation.as_str()
        })
        .await;
    assert_eq!(end["code"], "cancelled", "{end}");
    cluster.upstream.wait_closed(1).await;
    // Once it ended, nobody lists it any more.
    let mut listed = active(b, "u").await;
    for _ in 0..100 {
        if listed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        listed = active(b, "u").await;
    }
    assert!(listed.is_empty(), "{listed:?}");
}
