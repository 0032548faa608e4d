//! Usage and cost: what each reply consumed, on every outcome.
//!
//! Every generation ends with a [`UsageRecord`], whether it finished,
//! failed, was cancelled or abandoned. Tokens are the providers' own counts
//! where they sent them; where they did not (a stream cut before its usage
//! chunk, a cancelled reply), the record carries an estimate of four
//! characters per token and says so (`estimated`). Attempts that failed
//! before producing content are listed but not billed. Cost comes from the
//! `[[pricing]]` table, per upstream model.

use std::collections::HashMap;
use std::time::Duration;

use crate::config::PriceConfig;
use crate::provider::{ErrorClass, Usage};

/// The price table, by upstream model name.
#[derive(Debug, Clone, Default)]
pub struct Pricing {
    /// USD per million (prompt, completion) tokens.
    prices: HashMap<String, (f64, f64)>,
}

impl Pricing {
    /// The table from `[[pricing]]`.
    pub fn from_config(prices: &[PriceConfig]) -> Self {
        Self {
            prices: prices
                .iter()
                .map(|p| (p.model.clone(), (p.input_per_million, p.output_per_million)))
                .collect(),
        }
    }

    /// The cost of `usage` on `model` in USD, when the model has a price.
    pub fn cost(&self, model: &str, usage: &Usage) -> Option<f64> {
        let (input, output) = self.prices.get(model)?;
        Some(
            (usage.prompt_tokens as f64 * input + usage.completion_tokens as f64 * output)
                / 1_000_000.0,
        )
    }
}

/// How one upstream attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The upstream finished the reply.
    Ok,
    /// It failed with this class.
    Failed(ErrorClass),
    /// The gateway stopped it (client gone, cancel, shutdown).
    Cancelled,
}

/// One upstream attempt of a reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// The provider's configured name.
    pub provider: String,
    /// The upstream model.
    pub model: String,
    /// How it ended.
    pub outcome: AttemptOutcome,
    /// How long it ran.
    pub duration: Duration,
    /// Whether the upstream accepted the request (HTTP 2xx).
    pub accepted: bool,
    /// Characters of content it produced (text, reasoning, tool calls).
    pub content_chars: usize,
    /// The provider's usage report, if it sent one.
    pub reported: Option<Usage>,
    /// Tokens billed for this attempt: reported, estimated, or none.
    pub billed: Option<Usage>,
    /// Whether `billed` is an estimate.
    pub estimated: bool,
}

/// What a reply consumed, whatever its outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    /// The model name the client asked for.
    pub model: String,
    /// The provider that produced the final content, if any did.
    pub provider: Option<String>,
    /// The upstream model that produced the final content, if any did.
    pub upstream_model: Option<String>,
    /// `complete`, `failed`, `cancelled` or `aborted` (abandoned).
    pub outcome: &'static str,
    /// The error code of a failed reply.
    pub error: Option<&'static str>,
    /// Billed tokens over all attempts.
    pub usage: Usage,
    /// Whether any attempt's tokens are estimated.
    pub estimated: bool,
    /// Cost in USD, when every billed model has a price.
    pub cost_usd: Option<f64>,
    /// Every upstream attempt, in order.
    pub attempts: Vec<Attempt>,
}

/// Estimated tokens for `chars` characters (four per token, rounded up).
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

/// Sums the billed usage of `attempts`: (usage, any estimated, cost).
pub fn total(attempts: &[Attempt], pricing: &Pricing) -> (Usage, bool, Option<f64>) {
    let mut usage = Usage::default();
    let mut estimated = false;
    let mut cost = Some(0.0);
    for attempt in attempts {
        let Some(billed) = attempt.billed else {
            continue;
        };
        usage.prompt_tokens += billed.prompt_tokens;
        usage.completion_tokens += billed.completion_tokens;
        if let Some(cached) = billed.cached_prompt_tokens {
            *usage.cached_prompt_tokens.get_or_insert(0) += cached;
        }
        estimated |= attempt.estimated;
        cost = match (cost, pricing.cost(&attempt.model, &billed)) {
            (Some(sum), Some(c)) => Some(sum + c),
            _ => None,
        };
    }
    (usage, estimated, cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(model: &str, billed: Option<Usage>, estimated: bool) -> Attempt {
        Attempt {
            provider: "p".into(),
            model: model.into(),
            outcome: AttemptOutcome::Ok,
            duration: Duration::ZERO,
            accepted: true,
            content_chars: 0,
            reported: None,
            billed,
            estimated,
        }
    }

    fn usage(prompt: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_prompt_tokens: None,
        }
    }

    #[test]
    fn cost_is_tokens_times_price_per_million() {
        let pricing = Pricing::from_config(&[PriceConfig {
            model: "m".into(),
            input_per_million: 2.0,
            output_per_million: 10.0,
        }]);
        let cost = pricing.cost("m", &usage(1_000, 500)).unwrap();
        assert!((cost - 0.007).abs() < 1e-12, "{cost}");
        assert_eq!(pricing.cost("unpriced", &usage(1, 1)), None);
    }

    #[test]
    fn totals_add_billed_attempts_and_skip_unbilled_ones() {
        let pricing = Pricing::from_config(&[
            PriceConfig {
                model: "a".into(),
                input_per_million: 1.0,
                output_per_million: 1.0,
            },
            PriceConfig {
                model: "b".into(),
                input_per_million: 1.0,
                output_per_million: 1.0,
            },
        ]);
        let attempts = [
            attempt("a", None, false),
            attempt("a", Some(usage(10, 3)), true),
            attempt("b", Some(usage(12, 5)), false),
        ];
        let (sum, estimated, cost) = total(&attempts, &pricing);
        assert_eq!(sum, usage(22, 8));
        assert!(estimated);
        assert!((cost.unwrap() - 30.0 / 1_000_000.0).abs() < 1e-15);
        let (_, _, cost) = total(&[attempt("unpriced", Some(usage(1, 1)), false)], &pricing);
        assert_eq!(cost, None, "an unpriced model makes the cost unknown");
    }

    #[test]
    fn estimates_round_up() {
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(8), 2);
        assert_eq!(estimate_tokens(9), 3);
    }
}
