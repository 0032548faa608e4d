//! Rate limits, connection caps and daily token quotas (`src/limits/`).
//!
//! Local limiters run on tokio's clock, so these tests pause it and
//! advance it instead of sleeping. The cluster-wide tests share budgets
//! through a real `redis-server` of their own (tests/common/redis.rs) and
//! stop it to see each instance fall back to its local budget.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::redis::RedisServer;
use spillway::cluster::{Bus, LocalBus, RedisBus};
use spillway::config::{Config, LimitsConfig, TierConfig};
use spillway::limits::{Allowance, Bound, Kind, Limited, Limits};

/// A tier with small, distinct figures, so a test sees which one applies.
fn tier(name: &str, messages_per_minute: u32) -> TierConfig {
    TierConfig {
        name: name.into(),
        requests_per_minute: 100,
        messages_per_minute,
        connections_per_minute: 100,
        max_connections_per_user: 2,
        max_connections_per_tenant: 3,
        daily_tokens: 1_000,
    }
}

fn config(tiers: Vec<TierConfig>) -> LimitsConfig {
    LimitsConfig {
        ip_requests_per_minute: 3,
        housekeeping_secs: 10,
        tiers,
        ..LimitsConfig::default()
    }
}

fn local_bus() -> Arc<dyn Bus> {
    Arc::new(LocalBus::new("test".into(), &Config::default()))
}

fn local_limits(config: &LimitsConfig) -> Arc<Limits> {
    Limits::new(config, local_bus())
}

/// Lets spawned tasks (housekeeping) run after the paused clock moved.
async fn run_tasks() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_message_burst_is_allowed_then_limited_until_one_cell_replenishes() {
    // 5 per minute: a burst of 5, one more every 12 s.
    let limits = local_limits(&config(vec![tier("basic", 5)]));
    for left in (0..5).rev() {
        let allowed = limits.check(Kind::Message, "t/u", "basic").await.unwrap();
        assert_eq!(allowed.limit, 5);
        assert_eq!(allowed.remaining, left);
    }
    let limited = limits
        .check(Kind::Message, "t/u", "basic")
        .await
        .unwrap_err();
    assert_eq!(limited.bound, Bound::Rate(Kind::Message));
    assert_eq!(limited.code(), "rate_limited");
    assert_eq!((limited.limit, limited.remaining), (5, 0));
    assert_eq!(limited.retry_after, Some(Duration::from_secs(12)));
    // Full again 12 s for the next cell plus 4 × 12 s.
    assert_eq!(limited.reset_secs, Some(60));
    let headers: Vec<String> = limited
        .headers()
        .iter()
        .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap()))
        .collect();
    assert_eq!(
        headers,
        [
            "retry-after: 12",
            "x-ratelimit-limit: 5",
            "x-ratelimit-remaining: 0",
            "x-ratelimit-reset: 60",
        ]
    );

    // Not yet.
    tokio::time::advance(Duration::from_millis(11_900)).await;
    let limited = limits
        .check(Kind::Message, "t/u", "basic")
        .await
        .unwrap_err();
    assert_eq!(limited.retry_after, Some(Duration::from_millis(100)));
    // One cell, and one only.
    tokio::time::advance(Duration::from_millis(100)).await;
    let allowed = limits.check(Kind::Message, "t/u", "basic").await.unwrap();
    assert_eq!(allowed.remaining, 0);
    assert!(limits.check(Kind::Message, "t/u", "basic").await.is_err());
    assert_eq!(limits.refused(), 3);
}

#[tokio::test(start_paused = true)]
async fn keys_kinds_and_tiers_are_counted_apart() {
    let limits = local_limits(&config(vec![tier("basic", 2), tier("pro", 4)]));
    for _ in 0..2 {
        limits.check(Kind::Message, "t/a", "basic").await.unwrap();
    }
    assert!(limits.check(Kind::Message, "t/a", "basic").await.is_err());
    // Another key, and another kind of the same key, are untouched.
    let other = limits.check(Kind::Message, "t/b", "basic").await.unwrap();
    assert_eq!(other.remaining, 1);
    let request = limits.check(Kind::Request, "t/a", "basic").await.unwrap();
    assert_eq!((request.limit, request.remaining), (100, 99));
    // A tier that is not listed gets the first one.
    for _ in 0..2 {
        limits.check(Kind::Message, "t/c", "gold").await.unwrap();
    }
    let limited = limits
        .check(Kind::Message, "t/c", "gold")
        .await
        .unwrap_err();
    assert_eq!(limited.limit, 2);
    // The listed second tier has its own figure.
    for left in (0..4).rev() {
        let allowed = limits.check(Kind::Message, "t/d", "pro").await.unwrap();
        assert_eq!((allowed.limit, allowed.remaining), (4, left));
    }
    assert!(limits.check(Kind::Message, "t/d", "pro").await.is_err());
}

#[tokio::test(start_paused = true)]
async fn client_addresses_get_ip_requests_per_minute_whatever_the_tier() {
    let limits = local_limits(&config(vec![tier("basic", 5)]));
    for left in (0..3).rev() {
        let allowed = limits.check(Kind::Ip, "203.0.113.7", "").await.unwrap();
        assert_eq!((allowed.limit, allowed.remaining), (3, left));
    }
    let limited = limits
        .check(Kind::Ip, "203.0.113.7", "basic")
        .await
        .unwrap_err();
    assert_eq!(limited.bound, Bound::Rate(Kind::Ip));
    assert_eq!(limited.limit, 3);
    // 20 s per address per request.
    assert_eq!(limited.retry_after, Some(Duration::from_secs(20)));
    limits.check(Kind::Ip, "203.0.113.8", "").await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn disabled_limits_allow_everything_but_caps() {
    let config = LimitsConfig {
        enabled: false,
        ..config(vec![tier("basic", 1)])
    };
    let limits = local_limits(&config);
    for _ in 0..1_000 {
        let allowed = limits.check(Kind::Message, "t/u", "basic").await.unwrap();
        assert_eq!(allowed, Allowance::UNLIMITED);
        assert!(allowed.headers().is_empty());
        limits.check(Kind::Ip, "203.0.113.7", "").await.unwrap();
    }
    let reservation = limits
        .reserve_tokens("t", "u", "basic", 1_000_000)
        .await
        .unwrap();
    assert!(!reservation.is_metered());
    reservation.settle(5_000_000);
    limits.reserve_tokens("t", "u", "basic", 1).await.unwrap();
    assert_eq!(limits.refused(), 0);
    // Caps always apply.
    let _a = limits.connect("t", "u", "basic").unwrap();
    let _b = limits.connect("t", "u", "basic").unwrap();
    assert!(limits.connect("t", "u", "basic").is_err());
}

#[tokio::test(start_paused = true)]
async fn housekeeping_forgets_idle_keys_and_keeps_busy_ones() {
    // 60 per minute: a key is as good as fresh a second after its last
    // cell replenished. Housekeeping every 10 s.
    let limits = local_limits(&config(vec![tier("basic", 60)]));
    for i in 0..5 {
        limits
            .check(Kind::Message, &format!("t/idle{i}"), "basic")
            .await
            .unwrap();
    }
    for _ in 0..60 {
        limits
            .check(Kind::Message, "t/busy", "basic")
            .await
            .unwrap();
    }
    assert_eq!(limits.tracked_keys(), 6);

    tokio::time::advance(Duration::from_secs(9)).await;
    run_tasks().await;
    assert_eq!(limits.tracked_keys(), 6, "no sweep before the period");

    tokio::time::advance(Duration::from_secs(1)).await;
    run_tasks().await;
    assert_eq!(limits.tracked_keys(), 1, "idle keys forgotten, busy kept");
    // The busy key's state was kept: 10 cells replenished, not 60.
    let busy = limits
        .check(Kind::Message, "t/busy", "basic")
        .await
        .unwrap();
    assert_eq!(busy.remaining, 9);

    tokio::time::advance(Duration::from_secs(70)).await;
    run_tasks().await;
    assert_eq!(limits.tracked_keys(), 0);
    // A forgotten key starts afresh.
    let allowed = limits
        .check(Kind::Message, "t/idle0", "basic")
        .await
        .unwrap();
    assert_eq!(allowed.remaining, 59);
}

#[tokio::test]
async fn connection_caps_refuse_the_next_connection_and_a_dropped_permit_frees_a_slot() {
    // 2 per user, 3 per tenant.
    let limits = local_limits(&config(vec![tier("basic", 5)]));
    let u1_first = limits.connect("acme", "u1", "basic").unwrap();
    let _u1_second = limits.connect("acme", "u1", "basic").unwrap();
    let refused = limits.connect("acme", "u1", "basic").unwrap_err();
    assert_eq!(refused.bound, Bound::UserConnections);
    assert_eq!(refused.code(), "too_many_connections");
    assert_eq!((refused.limit, refused.retry_after), (2, None));

    let _u2 = limits.connect("acme", "u2", "basic").unwrap();
    let refused = limits.connect("acme", "u3", "basic").unwrap_err();
    assert_eq!(refused.bound, Bound::TenantConnections);
    assert_eq!(refused.limit, 3);
    // Other tenants have their own cap.
    let _other = limits.connect("globex", "u1", "basic").unwrap();

    drop(u1_first);
    let _u3 = limits.connect("acme", "u3", "basic").unwrap();
    // u1 has a free slot of its own, but the tenant is full again.
    let refused = limits.connect("acme", "u1", "basic").unwrap_err();
    assert_eq!(refused.bound, Bound::TenantConnections);
    assert_eq!(limits.refused(), 3);
}

#[tokio::test]
async fn token_quota_reserves_and_settles_in_turn() {
    // 1 000 tokens a day.
    let limits = local_limits(&config(vec![tier("basic", 5)]));
    let first = limits
        .reserve_tokens("acme", "u", "basic", 300)
        .await
        .unwrap();
    assert!(first.is_metered());
    let today = limits.tokens_today("acme", "u").await;
    assert_eq!((today.used, today.reserved), (0, 300));
    first.settle(200);
    let today = limits.tokens_today("acme", "u").await;
    assert_eq!((today.used, today.reserved), (200, 0));

    // In flight: 500. What is left (300) does not hold 400.
    let long = limits
        .reserve_tokens("acme", "u", "basic", 500)
        .await
        .unwrap();
    let refused = limits
        .reserve_tokens("acme", "u", "basic", 400)
        .await
        .unwrap_err();
    assert_eq!(refused.bound, Bound::DailyTokens);
    assert_eq!(refused.code(), "quota_exceeded");
    assert_eq!((refused.limit, refused.remaining), (1_000, 300));
    assert_eq!(refused.retry_after, None, "free again when a reply settles");
    let short = limits
        .reserve_tokens("acme", "u", "basic", 300)
        .await
        .unwrap();
    long.settle(450);
    // Dropped unsettled: counted at its estimate.
    drop(short);
    let today = limits.tokens_today("acme", "u").await;
    assert_eq!((today.used, today.reserved), (950, 0));

    // Nothing in flight and the day not spent: the last reply runs alone,
    // though its estimate is more than what is left.
    let last = limits
        .reserve_tokens("acme", "u", "basic", 200)
        .await
        .unwrap();
    assert!(
        limits
            .reserve_tokens("acme", "u", "basic", 1)
            .await
            .is_err()
    );
    last.settle(120);
    let refused = limits
        .reserve_tokens("acme", "u", "basic", 1)
        .await
        .unwrap_err();
    assert_eq!(refused.remaining, 0);
    assert!(refused.retry_after.is_some(), "spent: retry tomorrow");
    assert_eq!(limits.tokens_today("acme", "u").await.used, 1_070);
    // Other users have their own day.
    limits
        .reserve_tokens("acme", "other", "basic", 1_000)
        .await
        .unwrap()
        .settle(1);
}

#[tokio::test(start_paused = true)]
async fn concurrent_streams_overshoot_the_quota_by_at_most_one_reply() {
    const QUOTA: u64 = 10_000;
    /// Every reply reserves this much and uses at most as much.
    const MAX_REPLY: u64 = 800;
    let limits = local_limits(&config(vec![TierConfig {
        daily_tokens: QUOTA,
        ..tier("basic", 5)
    }]));
    let settled = Arc::new(AtomicU64::new(0));
    // Refusals while replies in flight held the rest / once the day was
    // spent.
    let held = Arc::new(AtomicU64::new(0));
    let spent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for task in 0..20u64 {
        let (limits, settled, held, spent) = (
            Arc::clone(&limits),
            Arc::clone(&settled),
            Arc::clone(&held),
            Arc::clone(&spent),
        );
        tasks.push(tokio::spawn(async move {
            for round in 0..1_000u64 {
                match limits.reserve_tokens("acme", "u", "basic", MAX_REPLY).await {
                    Ok(reservation) => {
                        // Stream for a while, then settle what the reply
                        // used: from half the estimate to all of it.
                        let streaming = Duration::from_millis(5 + task * 7 + round % 3);
                        tokio::time::sleep(streaming).await;
                        let actual = MAX_REPLY / 2 + (task * 37 + round * 91) % (MAX_REPLY / 2 + 1);
                        settled.fetch_add(actual, Ordering::Relaxed);
                        reservation.settle(actual);
                    }
                    Err(Limited {
                        retry_after: Some(_),
                        ..
                    }) => {
                        spent.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(_) => {
                        held.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                }
            }
            panic!("task {task} was never told the day is spent");
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let today = limits.tokens_today("acme", "u").await;
    let settled = settled.load(Ordering::Relaxed);
    assert_eq!(today.reserved, 0);
    assert_eq!(today.used, settled, "every settled token is counted");
    assert!(
        today.used >= QUOTA,
        "the quota was reached ({} used)",
        today.used
    );
    assert!(
        today.used <= QUOTA + MAX_REPLY,
        "{} used: more than one reply over {QUOTA}",
        today.used
    );
    // 12 replies of 800 fit at first; the other 8 tasks had to wait.
    assert!(held.load(Ordering::Relaxed) >= 8);
    assert_eq!(spent.load(Ordering::Relaxed), 20);
}

/// Two Redis buses on one server, both connected.
async fn two_buses(server: &RedisServer) -> (Arc<dyn Bus>, Arc<dyn Bus>) {
    let mut config = Config::default();
    config.cluster.redis_url = server.url();
    let a: Arc<dyn Bus> = RedisBus::start(&config, "limits-a".into());
    let b: Arc<dyn Bus> = RedisBus::start(&config, "limits-b".into());
    for bus in [&a, &b] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !bus.health().ok {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the bus did not connect to {}",
                server.url()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    (a, b)
}

#[tokio::test]
async fn cluster_wide_rate_budget_is_shared_and_each_instance_falls_back_alone_without_redis() {
    let server = RedisServer::start_new().await;
    let (bus_a, bus_b) = two_buses(&server).await;
    // 4 per minute (one every 15 s: the test is over long before).
    let config = config(vec![tier("basic", 4)]);
    let a = Limits::new(&config, bus_a);
    let b = Limits::new(&config, bus_b);

    // One budget for both instances.
    let mut remaining = Vec::new();
    for limits in [&a, &b, &a, &b] {
        let allowed = limits
            .check(Kind::Message, "acme/u", "basic")
            .await
            .unwrap();
        assert_eq!(allowed.limit, 4);
        remaining.push(allowed.remaining);
    }
    assert_eq!(remaining, [3, 2, 1, 0]);
    for limits in [&a, &b] {
        let limited = limits
            .check(Kind::Message, "acme/u", "basic")
            .await
            .unwrap_err();
        assert_eq!(limited.bound, Bound::Rate(Kind::Message));
        let retry = limited.retry_after.unwrap();
        assert!(
            retry > Duration::from_secs(10) && retry <= Duration::from_secs(15),
            "{retry:?}"
        );
    }
    // Other keys and kinds have budgets of their own.
    b.check(Kind::Message, "acme/v", "basic").await.unwrap();
    a.check(Kind::Request, "acme/u", "basic").await.unwrap();
    // The local limiters were not used.
    assert_eq!(a.tracked_keys() + b.tracked_keys(), 0);

    // Redis away: each instance enforces the budget alone.
    server.stop().await;
    for limits in [&a, &b] {
        let mut allowed = 0;
        for _ in 0..10 {
            if limits.check(Kind::Message, "acme/u", "basic").await.is_ok() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 4, "a full local budget, then refusals");
    }
}

#[tokio::test]
async fn cluster_wide_token_quota_is_shared_by_instances() {
    let server = RedisServer::start_new().await;
    let (bus_a, bus_b) = two_buses(&server).await;
    // 1 000 tokens a day.
    let config = config(vec![tier("basic", 5)]);
    let a = Limits::new(&config, bus_a);
    let b = Limits::new(&config, bus_b);

    let on_a = a.reserve_tokens("acme", "u", "basic", 600).await.unwrap();
    // B sees A's reservation.
    let refused = b
        .reserve_tokens("acme", "u", "basic", 500)
        .await
        .unwrap_err();
    assert_eq!(refused.bound, Bound::DailyTokens);
    assert_eq!(refused.remaining, 400);
    let on_b = b.reserve_tokens("acme", "u", "basic", 400).await.unwrap();
    on_a.settle(600);
    on_b.settle(350);
    a.flush().await;
    b.flush().await;
    for limits in [&a, &b] {
        let today = limits.tokens_today("acme", "u").await;
        assert_eq!((today.used, today.reserved), (950, 0));
    }
    // The last reply of the day runs alone, on either instance; then the
    // day is spent for both.
    b.reserve_tokens("acme", "u", "basic", 100)
        .await
        .unwrap()
        .settle(100);
    b.flush().await;
    for limits in [&a, &b] {
        let refused = limits
            .reserve_tokens("acme", "u", "basic", 1)
            .await
            .unwrap_err();
        assert!(refused.retry_after.is_some(), "spent for the day");
    }

    // Redis away: each instance goes on alone with what it has seen itself
    // (A: 600 used, B: 450), so together they may go past the quota.
    server.stop().await;
    let on_a = a.reserve_tokens("acme", "u", "basic", 300).await.unwrap();
    assert!(a.reserve_tokens("acme", "u", "basic", 200).await.is_err());
    on_a.settle(300);
    assert_eq!(a.tokens_today("acme", "u").await.used, 900);
    let on_b = b.reserve_tokens("acme", "u", "basic", 550).await.unwrap();
    assert!(b.reserve_tokens("acme", "u", "basic", 1).await.is_err());
    on_b.settle(550);
    assert_eq!(b.tokens_today("acme", "u").await.used, 1_000);
}
