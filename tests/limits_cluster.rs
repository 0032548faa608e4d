//! Cluster-wide rate limits as clients meet them: two real `spillway serve`
//! processes sharing a real `redis-server` of the test's own (and a fresh
//! PostgreSQL database, tests/common/cluster.rs), `[limits] cluster_wide =
//! true` and a per-user budget of [`BUDGET`] requests a minute. Requests go
//! over HTTP to `GET /v1/conversations` (no upstream involved), each one
//! counted by the per-principal request limit; in development mode
//! `X-Spillway-User` names the user.
//!
//! The budget replenishes one request every 60 / [`BUDGET`] seconds; every
//! test sends its requests one after the other, well within that, so the
//! counts below are exact.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use common::cluster::*;
use serde_json::Value;
use tokio::time::timeout;

/// Requests per minute per user (one every 15 s).
const BUDGET: u32 = 4;

/// A cluster of nodes `a` and `b` with a cluster-wide request budget of
/// [`BUDGET`] per user and minute for the (only) tier.
async fn cluster() -> Cluster {
    let settings = ClusterSettings {
        extra_toml: format!(
            "[limits]\ncluster_wide = true\n\n\
             [[limits.tiers]]\nname = \"default\"\nrequests_per_minute = {BUDGET}\n"
        ),
        ..ClusterSettings::default()
    };
    Cluster::start(&["a", "b"], settings).await
}

/// `GET /v1/conversations` on `node` as `user`.
async fn list(node: &Node, user: &str) -> reqwest::Response {
    timeout(
        WAIT,
        common::client()
            .get(node.url("/v1/conversations"))
            .header("x-spillway-user", user)
            .send(),
    )
    .await
    .unwrap_or_else(|_| panic!("node {} answers within {WAIT:?}", node.id))
    .expect("the gateway answers")
}

/// A header's value as a number (panics, failing the test, when absent).
fn number(response: &reqwest::Response, name: &str) -> u64 {
    let value = response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("{name} on {:?}", response.headers()));
    value.to_str().unwrap().parse().unwrap()
}

/// Asserts `response` is the 429 of a spent request budget: `Retry-After`
/// (1 to 60 / BUDGET s), `X-RateLimit-Limit` = BUDGET, `-Remaining` 0, a
/// `-Reset`, and the `rate_limited` error.
async fn assert_limited(response: reqwest::Response, what: &str) {
    assert_eq!(response.status().as_u16(), 429, "{what}");
    let retry_after = number(&response, "retry-after");
    assert!(
        (1..=u64::from(60 / BUDGET)).contains(&retry_after),
        "{what}: retry-after {retry_after}"
    );
    assert_eq!(
        number(&response, "x-ratelimit-limit"),
        u64::from(BUDGET),
        "{what}"
    );
    assert_eq!(number(&response, "x-ratelimit-remaining"), 0, "{what}");
    let reset = number(&response, "x-ratelimit-reset");
    assert!(reset >= retry_after, "{what}: reset {reset}");
    let body: Value = response.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "rate_limited", "{what}: {body}");
}

/// Requests of one user alternating between instances A and B share one
/// budget: exactly [`BUDGET`] are allowed across both (each instance alone
/// would have allowed them all and more), and the next one is 429 with
/// `Retry-After` and `X-RateLimit-*` on whichever instance receives it.
/// Another user has a whole budget of their own, on both instances.
#[tokio::test]
async fn two_gateway_processes_share_one_request_budget_through_redis() {
    let cluster = cluster().await;
    let (a, b) = (cluster.node("a"), cluster.node("b"));

    for i in 0..BUDGET {
        let node = if i % 2 == 0 { a } else { b };
        let response = list(node, "alice").await;
        assert_eq!(
            response.status().as_u16(),
            200,
            "alice's request {} (on {}) is within the budget",
            i + 1,
            node.id
        );
    }
    // Two requests on each instance so far: a local budget would have room.
    assert_limited(list(a, "alice").await, "alice over the budget, on A").await;
    assert_limited(list(b, "alice").await, "alice over the budget, on B").await;

    for node in [a, b, a, b] {
        let response = list(node, "bob").await;
        assert_eq!(response.status().as_u16(), 200, "bob on {}", node.id);
    }
    assert_limited(list(b, "bob").await, "bob over his own budget, on B").await;
    assert_limited(list(a, "alice").await, "alice still over it, on A").await;
}

/// With the test's Redis stopped, each instance falls back to its own local
/// limiter: it keeps answering, allows [`BUDGET`] requests of a user by
/// itself (so the fleet allows twice the budget), then answers 429 with
/// the same headers, never a 5xx.
#[tokio::test]
async fn without_redis_each_gateway_enforces_the_budget_alone_and_never_answers_5xx() {
    let cluster = cluster().await;
    let (a, b) = (cluster.node("a"), cluster.node("b"));
    // Shared while Redis runs: B sees A's requests.
    for _ in 0..BUDGET {
        assert_eq!(list(a, "alice").await.status().as_u16(), 200);
    }
    assert_limited(list(b, "alice").await, "alice on B, shared budget").await;

    cluster.redis().stop().await;
    for node in [a, b] {
        let mut statuses = Vec::new();
        for _ in 0..BUDGET + 2 {
            let response = list(node, "carol").await;
            let status = response.status().as_u16();
            assert!(
                status == 200 || status == 429,
                "node {}: {status} without Redis\n{}",
                node.id,
                node.log_tail(40)
            );
            statuses.push(status);
            if status == 429 {
                assert_limited(response, "carol over the local budget").await;
            }
        }
        let mut expected = vec![200; BUDGET as usize];
        expected.extend([429, 429]);
        assert_eq!(
            statuses, expected,
            "node {}: a whole local budget, then 429",
            node.id
        );
    }
}
