//! Spillway: a streaming chat gateway.
//!
//! Browser widgets, iframes and mobile apps hold long-lived SSE (and, later,
//! WebSocket) connections to Spillway; it calls LLM providers and relays
//! their tokens as they stream, with every connection's memory bounded.
//! `../DESIGN.md` in the project's shared folder is the map; `docs/` holds
//! the protocols and decisions.
//!
//! # Layout
//!
//! One request travels top to bottom:
//!
//! - [`http`]: the axum router and one file per surface (the
//!   OpenAI-compatible API in `http/openai.rs`, static assets);
//! - [`error`]: `ApiError`, the edge type every handler returns;
//! - [`protocol`]: the native wire protocol's frames (WebSocket and SSE);
//! - [`auth`]: who is calling: API keys, JWTs, widget visitor tokens →
//!   a `Principal`;
//! - [`chat`]: conversations live: rooms, members, presence, typing,
//!   sessions, sends and the replies they start;
//! - [`cluster`]: the bus to other instances: in-process (one instance) or
//!   Redis (fan-out, presence, sessions, replies mirrored and followed);
//! - [`limits`]: rate limits per principal and client address, connection
//!   caps, daily token quotas and tenant spending alerts, by tier;
//! - [`routing`]: model name → provider targets; retries, fail-over,
//!   continuation of cut replies, timeouts, circuit breakers;
//! - [`generation`]: the heart: one in-flight reply as an append-only event
//!   log that subscribers read through cursors, with coalescing, grace and
//!   cancellation;
//! - [`provider`]: one adapter per upstream wire format (OpenAI-compatible,
//!   Anthropic, the built-in mock), upstream SSE decoding, the normalized
//!   `ProviderEvent`;
//! - [`usage`]: tokens and cost of every reply, on every outcome;
//! - [`store`]: SQLite / PostgreSQL persistence behind a journaled
//!   write-behind persister;
//! - [`config`]: typed TOML + `SPILLWAY_*` environment configuration;
//! - [`metrics`]: every Prometheus metric, by name and labels;
//! - [`telemetry`]: tracing setup;
//! - [`shutdown`]: the signal that starts a graceful drain.

pub mod auth;
pub mod chat;
pub mod cluster;
pub mod config;
pub mod error;
pub mod generation;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod protocol;
pub mod provider;
pub mod routing;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod usage;
