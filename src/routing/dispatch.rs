//! One request's journey along its route.
//!
//! **Before the commit point** (no content relayed yet; a stream may have
//! opened with heartbeats, which is only preamble) every failure is free to
//! hide: a 429, 5xx, reset or malformed stream is retried on the same target
//! with exponential backoff and jitter (or after its `Retry-After`, when that
//! is short enough), within `retries_per_target`, the request's
//! `max_attempts` and the global retry budget; then the chain fails over to
//! the next target. A timeout is never retried on the same target. Errors
//! retrying cannot fix (context length, content policy, other 4xx) end the
//! request with the provider's reason, unless the route is configured to
//! fail over on that class.
//!
//! **After the commit point**, when the upstream dies, stalls or sends
//! garbage mid-answer, the reply moves on to the next target that can take
//! it: one marked `prefill` continues it from the partial answer (sent as a
//! trailing assistant message), and only the continuation is relayed, so the
//! client receives one seamless answer. With [`AfterCommit::Restart`] (the
//! native protocol) a target without prefill may instead restart the reply,
//! announced by [`RouteEvent::Restart`]. Otherwise, or when every candidate
//! fails too, the request ends with the **original** failure, never with a
//! later target's complaint about the prefill.
//!
//! Timeouts per attempt: time to first token (from the attempt's start,
//! including connect and headers), the idle gap between events, and a total
//! deadline. Breakers: each attempt holds a permit of its target's breaker,
//! resolved as success, failure or cancelled (a client that goes away is
//! neither); targets whose breaker is open are skipped.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::time::Instant;

use super::breaker::Permit;
use super::{Route, Router, Target};
use crate::provider::request::{Message, Role};
use crate::provider::{ChatRequest, ErrorClass, ProviderError, ProviderEvent, Usage};
use crate::usage::{Attempt, AttemptOutcome, estimate_tokens};

/// The target that is answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// The provider's configured name.
    pub provider: String,
    /// The upstream model.
    pub model: String,
}

/// What a dispatch yields.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteEvent {
    /// A target accepted the request (HTTP 2xx); what follows is its.
    Accepted(Served),
    /// A normalized event of the reply. Never `Usage`: usage is kept in the
    /// [`Ledger`], which bills every attempt.
    Event(ProviderEvent),
    /// The reply restarts from scratch on this target: discard what came
    /// before (native protocol only, see [`AfterCommit::Restart`]).
    Restart(Served),
}

/// What to do when an upstream fails after content reached the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCommit {
    /// Continue on a prefill-capable target, else fail (OpenAI endpoint).
    Continue,
    /// Continue on a prefill-capable target, else restart on the next one
    /// (native protocol, whose clients understand `restart`).
    Restart,
}

/// The events of a dispatched request; it ends after the reply's last
/// event, or with the error that ended it.
pub type RouteStream = BoxStream<'static, Result<RouteEvent, ProviderError>>;

/// Every attempt of one request, kept up to date while they run, so usage
/// can be billed however the request ends (even if its stream is dropped).
#[derive(Debug, Default)]
pub struct Ledger {
    entries: Mutex<Vec<Entry>>,
}

#[derive(Debug)]
struct Entry {
    served: Served,
    started: Instant,
    ended: Option<(std::time::Duration, AttemptOutcome)>,
    accepted: bool,
    /// Characters of the request sent (for a prompt estimate).
    prompt_chars: usize,
    content_chars: usize,
    reported: Option<Usage>,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        // Each section is one push or one field update; still whole.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn begin(&self, served: &Served, prompt_chars: usize) -> usize {
        let mut entries = self.lock();
        entries.push(Entry {
            served: served.clone(),
            started: Instant::now(),
            ended: None,
            accepted: false,
            prompt_chars,
            content_chars: 0,
            reported: None,
        });
        entries.len() - 1
    }

    fn update(&self, index: usize, change: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.lock().get_mut(index) {
            change(entry);
        }
    }

    fn end(&self, index: usize, outcome: AttemptOutcome) {
        self.update(index, |e| e.ended = Some((e.started.elapsed(), outcome)));
    }

    /// The attempts so far; one still running is reported as cancelled
    /// (the caller asks once the request is over).
    pub fn attempts(&self) -> Vec<Attempt> {
        self.lock()
            .iter()
            .map(|e| {
                let (duration, outcome) = e
                    .ended
                    .unwrap_or((e.started.elapsed(), AttemptOutcome::Cancelled));
                let (billed, estimated) = match e.reported {
                    Some(reported) => (Some(reported), false),
                    // Content was produced, so tokens were spent: estimate.
                    None if e.content_chars > 0 => (
                        Some(Usage {
                            prompt_tokens: estimate_tokens(e.prompt_chars),
                            completion_tokens: estimate_tokens(e.content_chars),
                            cached_prompt_tokens: None,
                        }),
                        true,
                    ),
                    // Failed before any content: recorded, not billed.
                    None => (None, false),
                };
                Attempt {
                    provider: e.served.provider.clone(),
                    model: e.served.model.clone(),
                    outcome,
                    duration,
                    accepted: e.accepted,
                    content_chars: e.content_chars,
                    reported: e.reported,
                    billed,
                    estimated,
                }
            })
            .collect()
    }
}

/// What has been relayed to the client so far.
#[derive(Debug, Default)]
struct Partial {
    /// The answer text relayed (what a continuation prefills).
    text: String,
    /// Any content relayed at all: the commit point has passed.
    committed: bool,
    /// Content a text prefill cannot carry (tool calls, refusal, reasoning
    /// without text) was relayed.
    unprefillable: bool,
    /// The model finished; a failure after this is not a failure.
    finished: bool,
}

impl Partial {
    fn observe(&mut self, event: &ProviderEvent) {
        match event {
            ProviderEvent::Text(text) => {
                self.text.push_str(text);
                self.committed = true;
            }
            ProviderEvent::Reasoning(_) => self.committed = true,
            ProviderEvent::Refusal(_) | ProviderEvent::ToolCall(_) => {
                self.committed = true;
                self.unprefillable = true;
            }
            ProviderEvent::Finish(_) => self.finished = true,
            ProviderEvent::Usage(_) | ProviderEvent::Restart => {}
        }
    }

    /// Whether `target` can continue this reply from a prefill.
    fn continues_on(&self, target: &Target) -> bool {
        target.prefill && !self.unprefillable && !self.text.trim_end().is_empty()
    }
}

/// The characters of content an event carries.
fn content_chars(event: &ProviderEvent) -> Option<usize> {
    match event {
        ProviderEvent::Text(t) | ProviderEvent::Reasoning(t) | ProviderEvent::Refusal(t) => {
            Some(t.len())
        }
        ProviderEvent::ToolCall(call) => {
            Some(call.arguments.len() + call.name.as_ref().map_or(0, String::len))
        }
        ProviderEvent::Usage(_) | ProviderEvent::Finish(_) | ProviderEvent::Restart => None,
    }
}

/// How an attempt's failure resolves its breaker permit: failures of the
/// provider count, rejections of the request show a healthy provider, and
/// the gateway's own bound is neither.
fn resolve(permit: Permit, class: ErrorClass) {
    match class {
        ErrorClass::Connect
        | ErrorClass::Timeout
        | ErrorClass::RateLimited
        | ErrorClass::Unavailable
        | ErrorClass::Protocol
        | ErrorClass::Auth => permit.failure(),
        ErrorClass::InvalidRequest | ErrorClass::ContextLength | ErrorClass::ContentPolicy => {
            permit.success();
        }
        ErrorClass::ReplyTooLarge | ErrorClass::Interrupted | ErrorClass::Gap => permit.cancel(),
    }
}

/// The request for `target`: the client's, under the target's model name,
/// plus, for a continuation, the partial answer as a trailing assistant
/// message (trailing whitespace trimmed: Anthropic rejects it).
fn request_for(request: &ChatRequest, target: &Target, prefill: Option<&str>) -> ChatRequest {
    let mut request = request.clone();
    request.model.clone_from(&target.model);
    if let Some(prefill) = prefill {
        request
            .messages
            .push(Message::text(Role::Assistant, prefill.trim_end()));
    }
    request
}

impl Router {
    /// Dispatches `request` along `route` (see the module docs for the
    /// policy). Attempts are recorded in `ledger` as they run. Dropping the
    /// stream cancels the attempt in flight and closes its connection.
    pub fn dispatch(
        self: &Arc<Self>,
        route: Arc<Route>,
        request: ChatRequest,
        after_commit: AfterCommit,
        ledger: Arc<Ledger>,
    ) -> RouteStream {
        let router = Arc::clone(self);
        Box::pin(async_stream::stream! {
            router.budget.deposit();
            let policy = router.policy.clone();
            let mut attempts = 0u32;
            let mut partial = Partial::default();
            // The first failure after the commit point: what the client is
            // told if nothing can take the reply over.
            let mut original: Option<ProviderError> = None;
            let mut last: Option<ProviderError> = None;

            'chain: for index in route.plan() {
                let target = &route.targets[index];
                let served = Served {
                    provider: target.provider.name().to_owned(),
                    model: target.model.clone(),
                };
                let mut retries = 0u32;
                let target_labels = crate::metrics::TargetLabels {
                    provider: served.provider.clone(),
                    model: served.model.clone(),
                };
                let provider_labels = crate::metrics::ProviderLabels { provider: served.provider.clone() };
                if attempts > 0 {
                    crate::metrics::get()
                        .failovers
                        .get_or_create(&crate::metrics::RouteLabels { route: route.name.clone() })
                        .inc();
                }
                loop {
                    if attempts >= policy.max_attempts {
                        break 'chain;
                    }
                    let continuing = partial.committed && partial.continues_on(target);
                    let restarting = partial.committed && !continuing;
                    if restarting && after_commit == AfterCommit::Continue {
                        continue 'chain;
                    }
                    let Some(permit) = target.breaker.try_acquire() else {
                        tracing::debug!(provider = %served.provider, model = %served.model, "breaker open, skipping target");
                        if last.is_none() {
                            last = Some(ProviderError::new(
                                ErrorClass::Unavailable,
                                format!("provider '{}' is unavailable (circuit open)", served.provider),
                            ));
                        }
                        continue 'chain;
                    };
                    attempts += 1;
                    let prefill = continuing.then_some(partial.text.as_str());
                    let upstream_request = request_for(&request, target, prefill);
                    let entry = ledger.begin(&served, upstream_request.prompt_chars());
                    // A continuation's first text must not repeat the
                    // whitespace its prefill had trimmed off.
                    let mut trim_start = continuing && partial.text.trim_end().len() < partial.text.len();

                    let started = Instant::now();
                    let deadline = started + target.deadline;
                    let first_token_by = (started + target.ttft).min(deadline);
                    let connected = tokio::time::timeout_at(
                        first_token_by,
                        target.provider.stream(upstream_request),
                    )
                    .await;
                    let result: Result<(), ProviderError> = match connected {
                        Err(_) => Err(ProviderError::new(
                            ErrorClass::Timeout,
                            format!("provider '{}' did not answer within {} ms", served.provider, target.ttft.as_millis()),
                        )),
                        Ok(Err(err)) => Err(err),
                        Ok(Ok(mut upstream)) => {
                            ledger.update(entry, |e| e.accepted = true);
                            if restarting {
                                crate::metrics::get().restarts.get_or_create(&provider_labels).inc();
                                partial = Partial::default();
                                yield Ok(RouteEvent::Restart(served.clone()));
                            } else {
                                if continuing {
                                    crate::metrics::get().continuations.get_or_create(&provider_labels).inc();
                                }
                                yield Ok(RouteEvent::Accepted(served.clone()));
                            }
                            let mut got_content = false;
                            let mut last_content: Option<Instant> = None;
                            // When the last item arrived: once content flows,
                            // the idle limit counts from it.
                            let mut seen = started;
                            // One timer for the attempt, re-armed only when it
                            // fires early (content came since it was armed),
                            // not once per token.
                            let watchdog = tokio::time::sleep_until(first_token_by);
                            tokio::pin!(watchdog);
                            // Metric handles once per attempt, not a labelled
                            // lookup per token.
                            let (ttft, inter_token, deltas) = {
                                let metrics = crate::metrics::get();
                                (
                                    metrics.ttft.get_or_create(&target_labels).clone(),
                                    metrics.inter_token.get_or_create(&target_labels).clone(),
                                    metrics.deltas.get_or_create(&target_labels).clone(),
                                )
                            };
                            loop {
                                let next = tokio::select! {
                                    biased;
                                    next = upstream.next() => next,
                                    () = &mut watchdog => {
                                        let by = if got_content {
                                            (seen + target.idle).min(deadline)
                                        } else {
                                            first_token_by
                                        };
                                        if by > Instant::now() {
                                            watchdog.as_mut().reset(by);
                                            continue;
                                        }
                                        let what = if by == deadline {
                                            format!("exceeded its {} ms deadline", target.deadline.as_millis())
                                        } else if got_content {
                                            format!("stalled for {} ms mid-stream", target.idle.as_millis())
                                        } else {
                                            format!("sent no token within {} ms", target.ttft.as_millis())
                                        };
                                        break Err(ProviderError::new(
                                            ErrorClass::Timeout,
                                            format!("provider '{}' {what}", served.provider),
                                        ));
                                    }
                                };
                                if got_content {
                                    seen = Instant::now();
                                }
                                let mut event = match next {
                                    None => break Ok(()),
                                    Some(Err(err)) => break Err(err),
                                    Some(Ok(event)) => event,
                                };
                                if let ProviderEvent::Usage(usage) = event {
                                    ledger.update(entry, |e| e.reported = Some(usage));
                                    continue;
                                }
                                if trim_start && let ProviderEvent::Text(text) = &mut event {
                                    let trimmed = text.trim_start();
                                    if trimmed.is_empty() {
                                        continue;
                                    }
                                    *text = trimmed.to_owned();
                                    trim_start = false;
                                }
                                if let Some(chars) = content_chars(&event) {
                                    let now = Instant::now();
                                    match last_content {
                                        None => ttft.observe((now - started).as_secs_f64()),
                                        Some(last) => inter_token.observe((now - last).as_secs_f64()),
                                    }
                                    deltas.inc();
                                    last_content = Some(now);
                                    if !got_content {
                                        // From the first token on, the idle
                                        // limit replaces the first-token one.
                                        got_content = true;
                                        seen = now;
                                        watchdog.as_mut().reset((now + target.idle).min(deadline));
                                    }
                                    ledger.update(entry, |e| e.content_chars += chars);
                                }
                                partial.observe(&event);
                                yield Ok(RouteEvent::Event(event));
                            }
                        }
                    };

                    let outcome = match &result {
                        Ok(()) => "ok",
                        Err(_) if partial.finished => "ok",
                        Err(err) => crate::metrics::outcome(err.class),
                    };
                    crate::metrics::get()
                        .attempts
                        .get_or_create(&crate::metrics::AttemptLabels { provider: served.provider.clone(), outcome })
                        .inc();
                    let err = match result {
                        Ok(()) => {
                            permit.success();
                            ledger.end(entry, AttemptOutcome::Ok);
                            return;
                        }
                        // The model had finished: a failure after that (a
                        // missing terminator, a stall before [DONE]) loses
                        // nothing. Usage is estimated if it was not sent.
                        Err(_) if partial.finished => {
                            permit.success();
                            ledger.end(entry, AttemptOutcome::Ok);
                            return;
                        }
                        Err(err) => err,
                    };
                    resolve(permit, err.class);
                    ledger.end(entry, AttemptOutcome::Failed(err.class));
                    tracing::warn!(
                        provider = %served.provider,
                        model = %served.model,
                        class = err.class.code(),
                        status = err.status,
                        attempt = attempts,
                        committed = partial.committed,
                        "upstream attempt failed"
                    );

                    if partial.committed {
                        // Keep the real failure; try the rest of the chain.
                        if original.is_none() {
                            original = Some(err);
                        }
                        continue 'chain;
                    }
                    if !err.class.is_retryable() {
                        if route.fails_over_on(err.class) {
                            last = Some(err);
                            continue 'chain;
                        }
                        yield Err(err);
                        return;
                    }
                    if err.class == ErrorClass::Timeout || retries >= policy.retries_per_target {
                        last = Some(err);
                        continue 'chain;
                    }
                    let delay = match err.retry_after {
                        Some(after) if after > policy.max_retry_after => {
                            last = Some(err);
                            continue 'chain;
                        }
                        Some(after) => after,
                        None => policy.backoff.delay(retries),
                    };
                    if !router.budget.try_withdraw() {
                        tracing::warn!(provider = %served.provider, "retry budget exhausted, failing over");
                        last = Some(err);
                        continue 'chain;
                    }
                    retries += 1;
                    crate::metrics::get().retries.get_or_create(&provider_labels).inc();
                    last = Some(err);
                    tokio::time::sleep(delay).await;
                }
            }
            let err = original.or(last).unwrap_or_else(|| {
                ProviderError::new(ErrorClass::Unavailable, "no provider could take the request")
            });
            yield Err(err);
        })
    }
}
