//! Faults of a cluster: Redis going away mid-reply (and coming back empty),
//! and an instance killed with SIGKILL while it produces a reply that
//! another instance streams. Real `spillway serve` processes, a real
//! `redis-server` of the test's own, a fresh PostgreSQL database
//! (tests/common/cluster.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::time::Duration;

use common::cluster::*;
use common::openai_stream;
use serde_json::{Value, json};
use tokio::time::Instant;

/// The upstream's pace between tokens.
const PACE: Duration = Duration::from_millis(5);

/// A guard for what must happen after a fault (detection, recovery): a
/// failure past it means "never", not "slow".
const RECOVERY: Duration = Duration::from_secs(20);

fn generation_of(ack: &Value) -> (String, u64) {
    (
        ack["generation_id"].as_str().unwrap().to_owned(),
        ack["epoch"].as_u64().unwrap(),
    )
}

/// Asserts every frame of `frames` is a room event that may come and go
/// around an outage (`presence`, `typing`).
fn only_room_events(frames: &[Value], what: &str) {
    assert!(
        frames
            .iter()
            .all(|f| f["type"] == "presence" || f["type"] == "typing"),
        "{what}: unexpected frames {frames:#?}"
    );
}

#[tokio::test]
async fn redis_going_away_mid_reply_is_survived_and_recovered_from() {
    let cluster = Cluster::start(&["a", "b"], ClusterSettings::default()).await;
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    let tokens = long_reply(40);
    let (first, second) = tokens.split_at(20);
    let whole = tokens.concat();
    // The reply streams its first half, stalls (Redis goes away then), and
    // finishes while Redis is down.
    cluster.upstream.push(stalling_stream(first, second, PACE));
    let conversation = a.conversation("u").await;

    let mut b1 = b.ws("u").await;
    b1.subscribe(&conversation).await;
    let mut a1 = a.ws("u").await;
    let (ack, _) = a1.send_message(&conversation, "A long one", "o-1").await;
    let (generation, epoch) = generation_of(&ack);
    a1.until_reply(&generation).await;
    let (_, before) = b1.until_reply(&generation).await;
    assert!(
        before.iter().any(|f| f["type"] == "message"),
        "B1 got the message: {before:?}"
    );

    // Both devices have the first half: B1's through Redis.
    let first_half = first.concat();
    let mut on_a = Streamed::at(0);
    let mut on_b = Streamed::at(0);
    assert!(
        !a1.continue_stream(&generation, &mut on_a, WAIT, |s| s.text == first_half)
            .await
    );
    assert!(
        !b1.continue_stream(&generation, &mut on_b, WAIT, |s| s.text == first_half)
            .await
    );

    // Redis goes away; the upstream goes on.
    cluster.redis().stop().await;
    let stopped = Instant::now();
    let releaser = release_until_stopped(&cluster.upstream);
    // The producing instance does not need Redis to finish its own reply.
    assert!(
        a1.continue_stream(&generation, &mut on_a, WAIT, |_| false)
            .await,
        "A1's reply ends"
    );
    releaser.abort();
    assert_eq!(on_a.text, whole, "A1 streams the whole reply without Redis");
    assert_eq!(on_a.last()["type"], "done", "{:?}", on_a.last());
    for frame in &on_a.frames {
        assert_eq!(frame["epoch"].as_u64(), Some(epoch), "{frame}");
    }

    // Readiness tells the outage, on both instances.
    for node in [a, b] {
        let body = node.wait_readyz(503).await;
        assert_eq!(body["status"], "unready", "{}: {body}", node.id);
        assert_eq!(body["checks"]["redis"]["ok"], false, "{}: {body}", node.id);
        assert_eq!(
            body["checks"]["redis"]["configured"], true,
            "{}: {body}",
            node.id
        );
    }
    eprintln!("both unready {:?} after Redis stopped", stopped.elapsed());

    // A resume on B of a reply B does not follow (it may be on another
    // instance) cannot be answered now, and says so as retryable, not as
    // "reload from history". (B1's reply, followed already, resumes.)
    let elsewhere = uuid::Uuid::now_v7().to_string();
    let mut b2 = b.ws("u").await;
    b2.resume(&elsewhere, epoch, 0).await;
    let (refused, _) = b2
        .until(WAIT, "the resume's answer", |f| f["type"] == "error")
        .await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert_eq!(refused["retryable"], true, "{refused}");
    assert_eq!(refused["generation_id"], elsewhere.as_str());
    b2.resume(&generation, epoch, 0).await;
    let (resumed, _) = b2
        .until(WAIT, "the followed reply", |f| f["type"] == "delta")
        .await;
    assert_eq!(resumed["generation_id"], generation.as_str(), "{resumed}");
    assert_eq!(resumed["offset"], 0, "{resumed}");

    // Redis comes back, empty, on the same port.
    cluster.redis().start().await;
    let restarted = Instant::now();
    for node in [a, b] {
        let body = node.wait_readyz(200).await;
        assert_eq!(body["status"], "ready", "{}: {body}", node.id);
        assert_eq!(body["node"], node.id.as_str(), "{body}");
        assert_eq!(body["checks"]["redis"]["ok"], true, "{}: {body}", node.id);
        assert_eq!(body["checks"]["store"]["ok"], true, "{}: {body}", node.id);
    }
    eprintln!("both ready {:?} after Redis restarted", restarted.elapsed());

    // B1 gets the rest of the reply, nothing lost or doubled.
    assert!(
        b1.continue_stream(&generation, &mut on_b, RECOVERY, |_| false)
            .await,
        "B1's reply ends"
    );
    eprintln!("B1 done {:?} after Redis restarted", restarted.elapsed());
    assert_eq!(on_b.text, whole, "B1 recovers the gap byte-exact");
    assert_eq!(on_b.last(), on_a.last(), "B1 ends with the same done");
    only_room_events(&on_b.others, "B1 while following");

    // Cross-instance delivery is back. Room subscriptions come back on
    // their own after the restart: wait until A1's typing reaches B1 (a
    // harmless probe, resent until it arrives), then send.
    let probing = Instant::now();
    'probe: loop {
        assert!(
            probing.elapsed() < RECOVERY,
            "typing from A1 never reached B1 after Redis came back"
        );
        a1.send(json!({ "type": "typing", "conversation_id": conversation, "typing": true }))
            .await;
        let until = Instant::now() + Duration::from_millis(250);
        while let Some(frame) = b1
            .recv_within(until.saturating_duration_since(Instant::now()))
            .await
        {
            if frame["type"] == "typing" {
                break 'probe;
            }
            only_room_events(std::slice::from_ref(&frame), "B1 before the probe");
        }
    }
    eprintln!(
        "typing crossed again {:?} after Redis restarted",
        restarted.elapsed()
    );
    let tokens = long_reply(10);
    cluster.upstream.push(openai_stream(&refs(&tokens), PACE));
    let (ack, _) = a1
        .send_message(&conversation, "After the outage", "o-2")
        .await;
    let (generation, _) = generation_of(&ack);
    let (message, before) = b1
        .until(WAIT, "the message sent after the outage", |f| {
            f["type"] == "message"
        })
        .await;
    only_room_events(&before, "B1 before the message");
    assert_eq!(message["message"]["id"], ack["message_id"]);
    assert_eq!(message["message"]["content"], "After the outage");
    let (_, before) = b1.until_reply(&generation).await;
    only_room_events(&before, "B1 before the reply");
    a1.until_reply(&generation).await;
    let (on_a, on_b) = tokio::join!(a1.stream(&generation, 0), b1.stream(&generation, 0));
    assert_eq!(on_a.text, tokens.concat());
    assert_eq!(on_b.text, tokens.concat());
    assert_eq!(on_b.last(), on_a.last());
    assert_eq!(on_b.last()["type"], "done");
}

#[tokio::test]
async fn a_killed_instance_leaves_presence_and_interrupts_its_replies_elsewhere() {
    let mut cluster = Cluster::start(&["a", "b"], ClusterSettings::default()).await;
    let tokens = long_reply(10);
    let whole = tokens.concat();
    // The reply streams ten tokens and then stalls for good.
    cluster
        .upstream
        .push(stalling_stream(&tokens, &[], Duration::from_millis(20)));
    let conversation = cluster.node("b").conversation("u").await;

    // u has a device on each instance, in the conversation.
    let mut b1 = cluster.node("b").ws("u").await;
    assert_eq!(
        b1.subscribe(&conversation).await,
        presence(&conversation, "snapshot", "u", 1)
    );
    let mut a1 = cluster.node("a").ws("u").await;
    assert_eq!(
        a1.subscribe(&conversation).await,
        presence(&conversation, "snapshot", "u", 2)
    );
    assert_eq!(b1.recv().await, presence(&conversation, "join", "u", 2));

    // A1 starts a reply; B1 follows it through the room, and a connection
    // on B resumes it where A1 got to.
    let (ack, _) = a1.send_message(&conversation, "Go on and on", "k-1").await;
    let (generation, epoch) = generation_of(&ack);
    a1.until_reply(&generation).await;
    let mut on_a = Streamed::at(0);
    assert!(
        !a1.continue_stream(&generation, &mut on_a, WAIT, |s| s.next >= 4)
            .await
    );
    let cut = on_a.next;
    let mut b2 = cluster.node("b").ws("u").await;
    b2.resume(&generation, epoch, cut).await;
    let rest = tokens[cut as usize..].concat();
    let mut on_b2 = Streamed::at(cut);
    if !rest.is_empty() {
        assert!(
            !b2.continue_stream(&generation, &mut on_b2, WAIT, |s| s.text == rest)
                .await
        );
    }
    let (message, _) = b1
        .until(WAIT, "the message sent on A", |f| f["type"] == "message")
        .await;
    assert_eq!(message["message"]["id"], ack["message_id"]);
    b1.until_reply(&generation).await;
    let mut on_b1 = Streamed::at(0);
    assert!(
        !b1.continue_stream(&generation, &mut on_b1, WAIT, |s| s.text == whole)
            .await
    );

    // A dies without a word.
    cluster.node_mut("a").kill().await;
    let killed = Instant::now();
    drop(a1);

    // B1 hears A1's device leave (A's heartbeat lapses) and its reply end
    // as interrupted, in either order.
    let guard = Duration::from_secs(10);
    let mut left = None;
    let mut interrupted = None;
    while left.is_none() || interrupted.is_none() {
        let wait = guard.saturating_sub(killed.elapsed());
        let Some(frame) = b1.recv_within(wait).await else {
            panic!(
                "within {guard:?} of the kill, B1 got leave: {left:?}, interrupted: {interrupted:?}"
            );
        };
        if frame["type"] == "presence" {
            assert_eq!(
                frame,
                presence(&conversation, "leave", "u", 1),
                "A1's device leaves"
            );
            assert!(left.is_none(), "one leave: {frame}");
            left = Some(killed.elapsed());
        } else if frame["type"] == "error" {
            assert_eq!(frame["code"], "interrupted", "{frame}");
            assert_eq!(frame["generation_id"], generation, "{frame}");
            interrupted = Some(killed.elapsed());
        } else {
            panic!("B1 got something else after the kill: {frame}");
        }
    }
    eprintln!(
        "after SIGKILL of A: leave on B1 after {:?}, interrupted on B1 after {:?}",
        left.unwrap(),
        interrupted.unwrap()
    );

    // The resumer on B ends too, never hangs.
    let (error, before) = b2
        .until(
            guard.saturating_sub(killed.elapsed()),
            "interrupted on the resumer",
            |f| f["type"] == "error",
        )
        .await;
    assert!(before.is_empty(), "nothing more of the reply: {before:?}");
    assert_eq!(error["code"], "interrupted", "{error}");
    assert_eq!(error["generation_id"], generation, "{error}");
    eprintln!("interrupted on the resumer after {:?}", killed.elapsed());
    assert_eq!(on_b2.text, rest, "the resumer had everything A produced");

    // B is fine, and its presence no longer counts the dead instance's device.
    let b = cluster.node("b");
    let body = b.wait_readyz(200).await;
    assert_eq!(body["checks"]["redis"]["ok"], true, "{body}");
    let mut b3 = b.ws("u").await;
    assert_eq!(
        b3.subscribe(&conversation).await,
        presence(&conversation, "snapshot", "u", 2),
        "B1 and B3 only"
    );
    assert_eq!(b1.recv().await, presence(&conversation, "join", "u", 2));
}
