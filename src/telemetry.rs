//! Tracing setup: pretty lines for people, JSON lines for log pipelines;
//! and the trace context a request carries upstream.
//!
//! Every line of a request's work carries its request id: the HTTP layer
//! opens a `request` span with it, a reply's tasks run in a `generation`
//! span under the request's, and a WebSocket's task in a `ws` span with
//! its upgrade's request id. JSON lines list their spans' fields.
//!
//! What we log is chosen so that secrets and message content never appear:
//! request ids, generation ids, providers, error classes and counts, never
//! bodies, prompts, replies or keys.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, overrides
/// `log.level`. Calling it twice is harmless (the second call is ignored).
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // Already initialised (tests start several gateways in one process).
    drop(result);
}

/// What a request sends upstream to be recognised there: its request id
/// (`x-request-id`) and, when the client sent a W3C `traceparent`, a child
/// of it (same trace, a new parent id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// The request id (the client's, else the gateway's).
    pub request_id: String,
    /// The `traceparent` to send upstream, if the client sent a valid one.
    pub traceparent: Option<String>,
}

impl Trace {
    /// The trace of a request with `request_id` and `headers`.
    pub fn from_headers(request_id: &str, headers: &http::HeaderMap) -> Self {
        let traceparent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(child_traceparent);
        Self {
            request_id: request_id.to_owned(),
            traceparent,
        }
    }
}

/// A child of a valid version-00 `traceparent`
/// (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`): the same
/// trace id and flags, a fresh parent id. `None` for anything else.
pub fn child_traceparent(parent: &str) -> Option<String> {
    let parts: Vec<&str> = parent.trim().split('-').collect();
    let [version, trace_id, parent_id, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = *version == "00"
        && hex(trace_id, 32)
        && hex(parent_id, 16)
        && hex(flags, 2)
        && trace_id.bytes().any(|b| b != b'0')
        && parent_id.bytes().any(|b| b != b'0');
    if !valid {
        return None;
    }
    let span_id = loop {
        let id = fastrand::u64(..);
        if id != 0 {
            break id;
        }
    };
    Some(format!("00-{trace_id}-{span_id:016x}-{flags}"))
}

tokio::task_local! {
    static TRACE: Trace;
}

/// Runs `work` with `trace` as the current request's trace (what
/// [`current`] returns inside it).
pub async fn scoped<F: std::future::Future>(trace: Trace, work: F) -> F::Output {
    TRACE.scope(trace, work).await
}

/// The trace of the request being served, inside [`scoped`].
pub fn current() -> Option<Trace> {
    TRACE.try_with(Clone::clone).ok()
}

/// Adds `trace`'s headers to an upstream call.
pub fn propagate(call: reqwest::RequestBuilder, trace: Option<&Trace>) -> reqwest::RequestBuilder {
    let Some(trace) = trace else { return call };
    let mut call = call.header("x-request-id", &trace.request_id);
    if let Some(traceparent) = &trace.traceparent {
        call = call.header("traceparent", traceparent);
    }
    call
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_child_keeps_the_trace_and_flags() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let child = child_traceparent(parent).unwrap_or_default();
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_eq!(child.len(), parent.len());
        assert_ne!(child, parent);
    }

    #[test]
    fn invalid_traceparents_are_dropped() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(child_traceparent(bad), None, "{bad}");
        }
    }
}
