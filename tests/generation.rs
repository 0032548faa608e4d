//! The generation log through its public API, on a paused clock: cursors,
//! coalescing, resume from any offset, grace and cancellation, bounds.
//! The upstream is the built-in mock provider (a product feature that
//! streams deterministic text at a configured pace).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::sync::Arc;
use std::time::Duration;

use std::path::Path;

use spillway::config::{Config, GenerationConfig};
use spillway::generation::{
    CancelReason, Outcome, Read, Registry, RegistryError, StartOptions, Subscriber,
};
use spillway::provider::{ChatRequest, ProviderEvent};
use spillway::routing::{AfterCommit, Route, Router};
use spillway::usage::Pricing;

/// The mock provider behind a one-target route, as the gateway builds it.
struct Mock {
    router: Arc<Router>,
    route: Arc<Route>,
}

fn mock(tokens: u32, delay_ms: u64) -> Mock {
    let toml = format!(
        "[[providers]]\nname = \"mock\"\nkind = \"mock\"\nmock_tokens = {tokens}\nmock_token_delay_ms = {delay_ms}\n\
         [[models]]\nname = \"mock\"\ntargets = [{{ provider = \"mock\", model = \"mock\" }}]\n"
    );
    let config = Config::parse(&toml, Path::new("test.toml"), Vec::new()).unwrap();
    let router = Arc::new(Router::from_config(&config).unwrap());
    let route = router.route("mock").unwrap();
    Mock { router, route }
}

fn start(
    registry: &Arc<Registry>,
    mock: Mock,
    options: StartOptions,
) -> Result<Subscriber, RegistryError> {
    registry.start(&mock.router, mock.route, request(), options)
}

fn request() -> ChatRequest {
    serde_json::from_value(serde_json::json!({
        "model": "mock",
        "messages": [{ "role": "user", "content": "hi" }]
    }))
    .unwrap()
}

fn registry(config: GenerationConfig) -> Arc<Registry> {
    Arc::new(Registry::new(config, Pricing::default()))
}

const KEEP: StartOptions = StartOptions {
    grace: Duration::from_secs(5),
    retain: Duration::from_secs(60),
    after_commit: AfterCommit::Continue,
    persist: None,
};

/// Reads to the end; returns (text, frames read, outcome).
async fn drain(subscriber: &mut Subscriber) -> (String, usize, Outcome) {
    let mut text = String::new();
    let mut frames = 0;
    let mut cursor = subscriber.cursor();
    loop {
        match subscriber.read().await {
            Read::Frames(batch) => {
                for frame in batch {
                    assert_eq!(frame.offset, cursor, "frames are contiguous");
                    cursor = frame.next;
                    frames += 1;
                    if let ProviderEvent::Text(t) = frame.event {
                        text.push_str(&t);
                    }
                }
            }
            Read::End(outcome) => return (text, frames, outcome),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_late_subscriber_replays_the_same_text_from_any_offset() {
    let registry = registry(GenerationConfig::default());
    let mut first = start(&registry, mock(30, 10), KEEP).unwrap();
    let (whole, _, outcome) = drain(&mut first).await;
    assert_eq!(outcome, Outcome::Complete);
    let generation = Arc::clone(first.generation());
    // The mock's events: the first word, then " word" each.
    let words: Vec<String> = whole
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            }
        })
        .collect();
    assert_eq!(words.len(), 30);
    // Events 0..30 are the words; then finish and usage.
    assert_eq!(generation.len(), 32);
    for offset in [0u64, 1, 7, 29, 30, 32] {
        let mut late = registry
            .get(generation.id())
            .expect("still resumable")
            .subscribe(offset);
        let (text, _, outcome) = drain(&mut late).await;
        let skipped: usize = words.iter().take(offset as usize).map(|w| w.len()).sum();
        assert_eq!(
            text,
            whole[skipped.min(whole.len())..],
            "from offset {offset}"
        );
        assert_eq!(outcome, Outcome::Complete);
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_reader_gets_fewer_larger_frames_with_the_same_text() {
    let registry = registry(GenerationConfig::default());
    let mut fast = start(&registry, mock(40, 10), KEEP).unwrap();
    let mut slow = fast.generation().subscribe(0);
    let fast_reader = tokio::spawn(async move { drain(&mut fast).await });
    // The slow reader does not read until the reply is complete.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (slow_text, slow_frames, _) = drain(&mut slow).await;
    let (fast_text, fast_frames, _) = fast_reader.await.unwrap();
    assert_eq!(slow_text, fast_text);
    assert_eq!(fast_frames, 42, "one frame per word, then finish and usage");
    assert_eq!(
        slow_frames, 3,
        "all text in one frame, then finish and usage"
    );
}

#[tokio::test(start_paused = true)]
async fn frames_never_exceed_the_configured_size() {
    let config = GenerationConfig {
        max_frame_bytes: 64,
        ..GenerationConfig::default()
    };
    let registry = registry(config);
    let mut subscriber = start(&registry, mock(200, 0), KEEP).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut text = String::new();
    while let Read::Frames(frames) = subscriber.read().await {
        let payload: usize = frames
            .iter()
            .map(|f| match &f.event {
                ProviderEvent::Text(t) => t.len(),
                _ => 0,
            })
            .sum();
        assert!(payload <= 64, "a read carried {payload} bytes");
        for frame in frames {
            if let ProviderEvent::Text(t) = frame.event {
                text.push_str(&t);
            }
        }
    }
    assert_eq!(text.split(' ').count(), 200);
}

#[tokio::test(start_paused = true)]
async fn a_subscriber_back_within_the_grace_period_keeps_the_reply_alive() {
    let registry = registry(GenerationConfig::default());
    let subscriber = start(&registry, mock(100, 100), KEEP).unwrap();
    let generation = Arc::clone(subscriber.generation());
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(subscriber);
    // Gone for 4 s of a 5 s grace: still running.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(generation.outcome(), None);
    let mut back = generation.subscribe(0);
    let (text, _, outcome) = drain(&mut back).await;
    assert_eq!(outcome, Outcome::Complete);
    assert_eq!(text.split(' ').count(), 100);
}

#[tokio::test(start_paused = true)]
async fn the_reply_is_cancelled_when_nobody_returns_within_the_grace_period() {
    let registry = registry(GenerationConfig::default());
    let subscriber = start(&registry, mock(1000, 100), KEEP).unwrap();
    let generation = Arc::clone(subscriber.generation());
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(subscriber);
    tokio::time::sleep(Duration::from_millis(5100)).await;
    assert_eq!(
        generation.outcome(),
        Some(Outcome::Cancelled(CancelReason::Abandoned))
    );
    let written = generation.len();
    assert!(written < 100, "the upstream stopped: {written} events");
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        generation.len(),
        written,
        "nothing is appended after cancellation"
    );
}

#[tokio::test(start_paused = true)]
async fn zero_grace_cancels_as_soon_as_the_last_subscriber_leaves() {
    let registry = registry(GenerationConfig::default());
    let options = StartOptions {
        grace: Duration::ZERO,
        retain: Duration::ZERO,
        after_commit: AfterCommit::Continue,
        persist: None,
    };
    let subscriber = start(&registry, mock(1000, 100), options).unwrap();
    let generation = Arc::clone(subscriber.generation());
    let second = generation.subscribe(0);
    drop(subscriber);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        generation.outcome(),
        None,
        "one subscriber is still reading"
    );
    drop(second);
    tokio::task::yield_now().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        generation.outcome(),
        Some(Outcome::Cancelled(CancelReason::Abandoned))
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(registry.get(generation.id()).is_none(), "nothing retained");
}

#[tokio::test(start_paused = true)]
async fn an_explicit_cancel_ends_every_reader_with_cancelled() {
    let registry = registry(GenerationConfig::default());
    let mut subscriber = start(&registry, mock(1000, 100), KEEP).unwrap();
    let generation = Arc::clone(subscriber.generation());
    tokio::time::sleep(Duration::from_secs(1)).await;
    generation.cancel(CancelReason::Requested);
    let (_, _, outcome) = drain(&mut subscriber).await;
    assert_eq!(outcome, Outcome::Cancelled(CancelReason::Requested));
}

#[tokio::test(start_paused = true)]
async fn a_reply_over_the_size_bound_fails_with_reply_too_large() {
    let config = GenerationConfig {
        max_frame_bytes: 64,
        max_reply_bytes: 100,
        ..GenerationConfig::default()
    };
    let registry = registry(config);
    let mut subscriber = start(&registry, mock(500, 0), KEEP).unwrap();
    let (text, _, outcome) = drain(&mut subscriber).await;
    assert!(text.len() <= 100, "{}", text.len());
    let Outcome::Failed(err) = outcome else {
        panic!("expected a failure, got {outcome:?}");
    };
    assert_eq!(err.class, spillway::provider::ErrorClass::ReplyTooLarge);
}

#[tokio::test(start_paused = true)]
async fn the_registry_is_bounded_and_forgets_after_the_resume_window() {
    let config = GenerationConfig {
        max_live: 1,
        ..GenerationConfig::default()
    };
    let registry = registry(config);
    let mut first = start(&registry, mock(3, 0), KEEP).unwrap();
    let refused = start(&registry, mock(3, 0), KEEP);
    assert!(matches!(refused, Err(RegistryError::Full { limit: 1 })));
    let id = first.generation().id();
    drain(&mut first).await;
    drop(first);
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert!(registry.get(id).is_some(), "resumable within the window");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(registry.get(id).is_none(), "forgotten after the window");
    assert!(start(&registry, mock(3, 0), KEEP).is_ok());
}

#[tokio::test(start_paused = true)]
async fn shutdown_cancels_running_generations_and_refuses_new_ones() {
    let registry = registry(GenerationConfig::default());
    let mut subscriber = start(&registry, mock(1000, 100), KEEP).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    registry.shutdown(Duration::from_secs(5)).await;
    let (_, _, outcome) = drain(&mut subscriber).await;
    assert_eq!(outcome, Outcome::Cancelled(CancelReason::Shutdown));
    assert!(matches!(
        start(&registry, mock(1, 0), KEEP),
        Err(RegistryError::ShuttingDown)
    ));
}

#[tokio::test(start_paused = true)]
async fn finished_replies_kept_for_resume_never_lock_new_ones_out() {
    let config = GenerationConfig {
        max_live: 2,
        ..GenerationConfig::default()
    };
    let registry = registry(config);
    let mut ids = Vec::new();
    // Six replies in a row, each finished and kept for its resume window.
    for _ in 0..6 {
        let mut subscriber = start(&registry, mock(2, 0), KEEP).expect("room for a new reply");
        ids.push(subscriber.generation().id());
        drain(&mut subscriber).await;
        drop(subscriber);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Kept ones are bounded (twice the running limit): the oldest went first.
    assert!(registry.len() <= 4, "{} held", registry.len());
    assert!(
        registry.get(ids[0]).is_none(),
        "the oldest finished was forgotten"
    );
    assert!(
        registry.get(ids[5]).is_some(),
        "the newest is still resumable"
    );
}
