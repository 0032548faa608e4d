//! Routing: which upstream answers a model name, and what happens when it
//! misbehaves.
//!
//! Each `[[models]]` entry becomes a [`Route`]: the name clients ask for and
//! its chain of [`Target`]s (provider + upstream model, tiered and weighted,
//! with per-target timeouts and a circuit breaker). [`Router::dispatch`]
//! drives one request along its route: retries before the commit point,
//! fail-over along the chain, continuation of a cut reply on a
//! prefill-capable target after it (see `dispatch.rs` for the policy, and
//! `docs/resilience.md`).
//!
//! - [`backoff`]: retry delays with jitter, `Retry-After` parsing;
//! - [`breaker`]: the per-target circuit breaker;
//! - [`budget`]: the global retry budget.

pub mod backoff;
pub mod breaker;
pub mod budget;
mod dispatch;
mod window;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

pub use dispatch::{AfterCommit, Ledger, RouteEvent, RouteStream, Served};

use crate::config::{Config, FallbackOn};
use crate::provider::{self, BuildError, ErrorClass, Provider};
use backoff::Backoff;
use breaker::{Breaker, BreakerConfig, BreakerState};
use budget::{BudgetConfig, RetryBudget};

/// One (provider, upstream model) pair of a route, with its knobs.
#[derive(Debug, Clone)]
pub struct Target {
    /// The adapter that talks to the provider.
    pub provider: Arc<dyn Provider>,
    /// The model name the provider knows.
    pub model: String,
    /// Lower tiers are tried first.
    pub tier: u32,
    /// Share of its tier's requests.
    pub weight: u32,
    /// Accepts an assistant prefill (can continue a cut reply).
    pub prefill: bool,
    /// From attempt start to the first content event.
    pub ttft: Duration,
    /// Longest silence between events once content flows.
    pub idle: Duration,
    /// Longest attempt.
    pub deadline: Duration,
    /// Shared by every route that uses this (provider, model).
    pub breaker: Arc<Breaker>,
}

/// A model name and the targets that can serve it.
#[derive(Debug)]
pub struct Route {
    /// What clients ask for.
    pub name: String,
    /// Never empty (config validation guarantees it).
    pub targets: Vec<Target>,
    /// Non-retryable error classes that still fail over.
    pub fallback_on: Vec<FallbackOn>,
}

impl Route {
    /// The order to try targets in for one request: tiers ascending; within
    /// a tier, a weighted random order (so weights share load).
    pub fn plan(&self) -> Vec<usize> {
        let mut tiers: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, target) in self.targets.iter().enumerate() {
            tiers.entry(target.tier).or_default().push(i);
        }
        let mut order = Vec::with_capacity(self.targets.len());
        for (_, mut tier) in tiers {
            while !tier.is_empty() {
                let total: u64 = tier
                    .iter()
                    .map(|&i| u64::from(self.targets[i].weight))
                    .sum();
                let mut pick = fastrand::u64(0..total.max(1));
                let mut chosen = 0;
                for (slot, &i) in tier.iter().enumerate() {
                    let weight = u64::from(self.targets[i].weight);
                    if pick < weight {
                        chosen = slot;
                        break;
                    }
                    pick -= weight;
                }
                order.push(tier.remove(chosen));
            }
        }
        order
    }

    /// Whether an error of `class` (one retrying cannot fix) fails over.
    pub fn fails_over_on(&self, class: ErrorClass) -> bool {
        self.fallback_on.iter().any(|on| {
            matches!(
                (on, class),
                (FallbackOn::ContextLength, ErrorClass::ContextLength)
                    | (FallbackOn::ContentPolicy, ErrorClass::ContentPolicy)
                    | (FallbackOn::InvalidRequest, ErrorClass::InvalidRequest)
            )
        })
    }
}

/// How requests move along a route.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Most attempts per request, over all targets.
    pub max_attempts: u32,
    /// Same-target retries before failing over.
    pub retries_per_target: u32,
    /// Delays between same-target retries.
    pub backoff: Backoff,
    /// Longest `Retry-After` worth waiting for.
    pub max_retry_after: Duration,
}

/// All routes, the retry policy, and the shared retry budget.
#[derive(Debug)]
pub struct Router {
    /// Sorted, so `/v1/models` lists models in a stable order.
    routes: BTreeMap<String, Arc<Route>>,
    /// One breaker per (provider, upstream model), shared across routes.
    breakers: BTreeMap<(String, String), Arc<Breaker>>,
    policy: RetryPolicy,
    /// Bounds retries across all requests, so an outage cannot multiply
    /// the load on a struggling provider.
    budget: RetryBudget,
}

impl Router {
    /// Builds every provider and route from a validated config.
    pub fn from_config(config: &Config) -> Result<Self, BuildError> {
        let mut providers: HashMap<&str, Arc<dyn Provider>> = HashMap::new();
        for entry in &config.providers {
            let used = config
                .models
                .iter()
                .any(|m| m.targets.iter().any(|t| t.provider == entry.name));
            // An unused provider need not have its key set.
            if used {
                providers.insert(&entry.name, provider::build(entry, &config.upstream)?);
            }
        }
        let routing = &config.routing;
        let breaker_config = BreakerConfig {
            window: Duration::from_secs(config.breaker.window_secs),
            min_requests: config.breaker.min_requests,
            failure_ratio: config.breaker.failure_ratio,
            cooldown: Duration::from_secs(config.breaker.cooldown_secs),
            half_open_probes: config.breaker.half_open_probes,
        };
        let mut breakers: BTreeMap<(String, String), Arc<Breaker>> = BTreeMap::new();
        let mut routes = BTreeMap::new();
        for model in &config.models {
            let mut targets = Vec::new();
            for (position, t) in model.targets.iter().enumerate() {
                let Some(provider) = providers.get(t.provider.as_str()) else {
                    continue;
                };
                let breaker = breakers
                    .entry((t.provider.clone(), t.model.clone()))
                    .or_insert_with(|| Arc::new(Breaker::new(breaker_config.clone())));
                let ms = Duration::from_millis;
                targets.push(Target {
                    provider: Arc::clone(provider),
                    model: t.model.clone(),
                    tier: t
                        .tier
                        .unwrap_or_else(|| u32::try_from(position).unwrap_or(u32::MAX)),
                    weight: t.weight.max(1),
                    prefill: t.prefill,
                    ttft: ms(t.ttft_timeout_ms.unwrap_or(routing.ttft_timeout_ms)),
                    idle: ms(t.idle_timeout_ms.unwrap_or(routing.idle_timeout_ms)),
                    deadline: ms(t.deadline_ms.unwrap_or(routing.deadline_ms)),
                    breaker: Arc::clone(breaker),
                });
            }
            let route = Route {
                name: model.name.clone(),
                targets,
                fallback_on: model.fallback_on.clone(),
            };
            routes.insert(model.name.clone(), Arc::new(route));
        }
        Ok(Self {
            routes,
            breakers,
            policy: RetryPolicy {
                max_attempts: routing.max_attempts,
                retries_per_target: routing.retries_per_target,
                backoff: Backoff {
                    base: Duration::from_millis(routing.backoff_base_ms),
                    max: Duration::from_millis(routing.backoff_max_ms),
                },
                max_retry_after: Duration::from_millis(routing.max_retry_after_ms),
            },
            budget: RetryBudget::new(BudgetConfig {
                ratio: routing.retry_budget_ratio,
                min_per_window: routing.retry_budget_min,
                window: Duration::from_secs(routing.retry_budget_window_secs),
            }),
        })
    }

    /// The route for `model`, if one is configured.
    pub fn route(&self, model: &str) -> Option<Arc<Route>> {
        self.routes
            .get(model)
            .filter(|r| !r.targets.is_empty())
            .cloned()
    }

    /// Configured model names, sorted.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }

    /// Every target's breaker state: (provider, upstream model, state).
    pub fn breaker_states(&self) -> Vec<(String, String, BreakerState)> {
        self.breakers
            .iter()
            .map(|((provider, model), breaker)| (provider.clone(), model.clone(), breaker.state()))
            .collect()
    }

    /// The retry policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}
