//! The built-in `mock` provider: a **demo and load-test** upstream that needs
//! no key and no network. It streams a fixed, deterministic text, one word
//! per event, at a configured pace, so a newcomer sees streaming the moment
//! the gateway starts and load tests have a cheap, predictable upstream.
//!
//! Its replies start with `[mock]` so nobody mistakes them for a model.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;

use super::{
    ChatRequest, EventStream, FinishReason, Provider, ProviderError, ProviderEvent, Usage,
};
use crate::config::ProviderConfig;

/// The words the mock cycles through.
const PASSAGE: &str = "[mock] This reply comes from Spillway's built-in mock provider. \
    It streams one word at a time at a fixed pace so you can watch tokens \
    arrive, test reconnects and measure the gateway without a provider key. \
    Configure a real provider in spillway.toml to talk to a model.";

/// The demo provider.
#[derive(Debug, Clone)]
pub struct MockProvider {
    name: String,
    /// Words per reply (before the client's `max_tokens` cap).
    tokens: u32,
    /// Pause before each word.
    token_delay: Duration,
}

impl MockProvider {
    /// Builds the mock from its configuration.
    pub fn new(config: &ProviderConfig) -> Self {
        Self {
            name: config.name.clone(),
            tokens: config.mock_tokens,
            token_delay: Duration::from_millis(config.mock_token_delay_ms),
        }
    }

    /// The words of a reply of `count` tokens: the passage, repeated.
    fn words(count: u32) -> impl Iterator<Item = String> {
        PASSAGE
            .split_whitespace()
            .cycle()
            .enumerate()
            .take(count as usize)
            .map(|(i, word)| {
                if i == 0 {
                    word.to_owned()
                } else {
                    format!(" {word}")
                }
            })
    }
}

impl Provider for MockProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn stream(&self, request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        let limit = request.token_limit().unwrap_or(u32::MAX);
        let count = self.tokens.min(limit);
        let finish = if count < self.tokens {
            FinishReason::Length
        } else {
            FinishReason::Stop
        };
        let usage = Usage {
            // The usual four-characters-per-token estimate.
            prompt_tokens: (request.prompt_chars() as u64).div_ceil(4),
            completion_tokens: u64::from(count),
            cached_prompt_tokens: None,
        };
        let delay = self.token_delay;
        let words = futures_util::stream::iter(Self::words(count)).then(move |word| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(ProviderEvent::Text(word))
        });
        let tail = futures_util::stream::iter([
            Ok(ProviderEvent::Finish(finish)),
            Ok(ProviderEvent::Usage(usage)),
        ]);
        Box::pin(async move { Ok(words.chain(tail).boxed()) })
    }
}
