//! Several instances as one: the [`Bus`] every conversation event and
//! resumable reply crosses.
//!
//! Two implementations: [`LocalBus`] (the embedded default: one instance,
//! nothing leaves the process) and [`RedisBus`] (a fleet sharing one
//! Redis). Through Redis:
//!
//! - **fan-out**: room events (messages, typing, presence, reply
//!   announcements) are published once per conversation channel and
//!   delivered to that conversation's members on every instance;
//! - **presence**: each instance refreshes its members in a per-room sorted
//!   set (score = expiry) and its own heartbeat in a node set, so a dead
//!   instance's members leave within a few heartbeats;
//! - **resume anywhere**: every native reply's log is mirrored to a Redis
//!   Stream in batches (entry id `1-<first offset>`) with a meta hash (epoch,
//!   top offset, terminal status), written and published by one script; any
//!   instance can follow it as a replica [`Generation`] that its transports
//!   read exactly like a local one;
//! - **idempotent sends** across instances;
//! - **shared limits**: fleet-wide rate budgets (GCRA) and daily token
//!   counters for `limits/`.
//!
//! Redis being away never stops local work: publishing is a bounded queue
//! drained by one task, every command has a timeout, and what was missed is
//! recovered by position checks and refreshes when it returns.
//! `docs/scaling.md` has the key layout, TTLs and guarantees.

mod local;
mod redis;
mod wire;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use local::LocalBus;
pub use redis::RedisBus;
pub use wire::{WireEvent, decode_outcome, encode_outcome};

use crate::config::Config;
use crate::generation::{Generation, GenerationId};

/// A member of a room on some instance: the instance (`node@epoch`) and
/// its presence id for the connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    /// The instance holding the connection: `node@epoch`.
    pub instance: String,
    /// The connection's presence id on that instance.
    pub connection: u64,
}

/// A conversation event as it crosses instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoomEvent {
    /// A user message (the history API's JSON of it).
    Message {
        /// The message.
        message: serde_json::Value,
    },
    /// A typing indicator.
    Typing {
        /// Who is typing.
        user_id: String,
        /// Started or stopped.
        typing: bool,
    },
    /// A device joined the room.
    Join {
        /// Its presence id on the publishing instance.
        connection: u64,
        /// Its user.
        user_id: String,
    },
    /// A device left the room.
    Leave {
        /// Its presence id on the publishing instance.
        connection: u64,
        /// Its user.
        user_id: String,
    },
    /// A reply started; members stream it.
    Reply {
        /// The generation.
        generation_id: String,
        /// Its epoch.
        epoch: u64,
    },
    /// The conversation was deleted.
    Forget,
}

/// What reaches this instance from the others.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// An event of a room this instance has members in.
    Room {
        /// The publishing instance (`node@epoch`).
        instance: String,
        /// The conversation.
        conversation_id: String,
        /// What happened.
        event: RoomEvent,
    },
    /// Another instance asks this one to stop a reply it produces.
    Cancel {
        /// The generation.
        generation_id: GenerationId,
    },
}

/// What a presence refresh learned: the instances alive now and the other
/// instances' members of each room asked about.
#[derive(Debug, Clone, Default)]
pub struct Refreshed {
    /// Live instances (`node@epoch`), this one included.
    pub live: HashSet<String>,
    /// Instances whose heartbeat lapsed (dead, or stopped). An instance in
    /// neither set is unknown (it may be starting).
    pub dead: HashSet<String>,
    /// Per conversation: other instances' members and their users.
    pub rooms: HashMap<String, HashMap<MemberKey, String>>,
}

/// What Redis remembers of a send, for idempotency across instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody sent it (or the bus cannot tell): go ahead.
    Fresh,
    /// Sent already: answer with the first ack.
    Sent {
        /// The stored message's id.
        message_id: String,
        /// The reply it started.
        generation_id: String,
    },
    /// Being sent on some instance right now.
    InProgress,
}

/// A session: who it is and what it was subscribed to, so a reconnect to
/// any instance picks up where it left off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// The session id (a UUID).
    pub id: String,
    /// The tenant.
    pub tenant_id: String,
    /// The user (or anonymous visitor).
    pub user_id: String,
    /// Conversations subscribed, in subscription order.
    pub conversations: Vec<String>,
    /// Unix ms when it was created.
    pub created_ms: u64,
}

/// A reply running somewhere in the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Active {
    /// The generation.
    pub generation_id: String,
    /// The conversation it answers.
    pub conversation_id: String,
    /// Its log's epoch (resume with it).
    pub epoch: u64,
    /// The instance producing it (`node@epoch`).
    pub instance: String,
    /// Unix seconds at creation.
    pub created: u64,
}

/// Why following a reply from another instance failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// Redis is unreachable.
    #[error("the cluster bus is unavailable")]
    Unavailable,
    /// Too many replies followed at once here.
    #[error("too many replies followed from other instances (limit {0})")]
    Busy(usize),
}

/// A fleet-wide rate-limit decision: GCRA in Redis, on Redis's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the cells conform (and were counted).
    pub allowed: bool,
    /// Further cells the budget admits now.
    pub remaining: u32,
    /// Refused: how long until the cells would conform.
    pub retry_after: Duration,
    /// How long until the whole budget is available again.
    pub reset: Duration,
}

/// A user's token counter for one UTC day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaCount {
    /// Settled tokens.
    pub used: u64,
    /// Tokens reserved by replies in flight.
    pub reserved: u64,
}

/// A reservation against a shared daily token counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaDecision {
    /// Whether it was admitted (and counted as reserved).
    pub admitted: bool,
    /// The counter afterwards (as found, when refused).
    pub count: QuotaCount,
}

/// The bus's health, for `/readyz` and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// `local` or `redis`.
    pub mode: &'static str,
    /// This instance's node id.
    pub node: String,
    /// Whether the bus works now (always for the local bus).
    pub ok: bool,
    /// Messages from Redis dropped because the inbound queue was full.
    pub dropped_inbound: u64,
    /// Events not published because the outbound queue was full or Redis
    /// was unreachable.
    pub dropped_outbound: u64,
    /// Batches a follower recovered by position check instead of pub/sub.
    pub recovered: u64,
    /// Replies followed from other instances now.
    pub followers: usize,
    /// Live instances seen at the last refresh.
    pub instances: usize,
}

/// How instances share conversations. Methods that talk to other
/// instances never block local work for longer than a command timeout, and
/// never at all while the bus is known to be down.
pub trait Bus: Send + Sync + fmt::Debug {
    /// This instance's node id.
    fn node(&self) -> &str;

    /// This instance in liveness and presence: `node@epoch` (a restarted
    /// node is a new instance).
    fn instance(&self) -> &str;

    /// Whether other instances exist behind this bus.
    fn is_shared(&self) -> bool;

    /// The events other instances send this one (taken once).
    fn inbound(&self) -> Option<mpsc::Receiver<Inbound>>;

    /// Publishes a room event to the other instances (in order per bus,
    /// at most once).
    fn publish(&self, conversation_id: &str, event: RoomEvent);

    /// Starts receiving a room's events; returns the other instances'
    /// members of it now.
    fn open_room<'a>(
        &'a self,
        conversation_id: &'a str,
    ) -> BoxFuture<'a, HashMap<MemberKey, String>>;

    /// Stops receiving a room's events.
    fn close_room(&self, conversation_id: &str);

    /// The heartbeat: refreshes this instance and its members
    /// (`(conversation, [(presence id, user)])`), and reads the others.
    /// `None` when the bus cannot tell (local, or Redis away).
    fn refresh<'a>(
        &'a self,
        local: &'a [(String, Vec<(u64, String)>)],
    ) -> BoxFuture<'a, Option<Refreshed>>;

    /// Mirrors a reply's log so other instances can resume it.
    fn mirror(&self, generation: &Arc<Generation>);

    /// A replica of a reply produced on another instance, following it
    /// live; `Ok(None)` when no instance has it.
    fn follow(
        &self,
        id: GenerationId,
    ) -> BoxFuture<'_, Result<Option<Arc<Generation>>, ClusterError>>;

    /// Asks the instance producing `generation` (a replica) to cancel it.
    fn cancel_remote(&self, generation: &Generation);

    /// Checks, and marks in progress, a send across instances.
    fn claim_send<'a>(
        &'a self,
        conversation_id: &'a str,
        client_message_id: &'a str,
    ) -> BoxFuture<'a, Claim>;

    /// Records a send's ack for resends on any instance.
    fn record_send(
        &self,
        conversation_id: &str,
        client_message_id: &str,
        message_id: &str,
        generation_id: &str,
    );

    /// Forgets a claim whose send failed.
    fn release_send(&self, conversation_id: &str, client_message_id: &str);

    /// Stores a session (with the bus's session TTL).
    fn save_session(&self, session: &Session);

    /// A stored session, if it has not expired.
    fn load_session<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Session>>;

    /// Replies of a user running on other instances.
    fn active<'a>(&'a self, tenant_id: &'a str, user_id: &'a str) -> BoxFuture<'a, Vec<Active>>;

    /// Counts `cost` cells against the fleet-wide budget `key` of
    /// `per_minute` (a burst of `per_minute`, replenishing evenly); `None`
    /// when the bus cannot decide (local, or Redis away): the caller then
    /// enforces its local budget alone.
    fn rate_limit<'a>(
        &'a self,
        key: &'a str,
        per_minute: u32,
        cost: u32,
    ) -> BoxFuture<'a, Option<RateDecision>>;

    /// Reserves `estimate` tokens of `user`'s shared `quota` for `day`
    /// (`yyyymmdd`) under the rule of `limits::quota::admits`; `None` when
    /// the bus cannot decide.
    fn reserve_quota<'a>(
        &'a self,
        tenant_id: &'a str,
        user_id: &'a str,
        day: u32,
        quota: u64,
        estimate: u64,
    ) -> BoxFuture<'a, Option<QuotaDecision>>;

    /// Replaces a reservation of `estimate` made with [`reserve_quota`]
    /// by the `actual` usage; false when Redis did not take it.
    ///
    /// [`reserve_quota`]: Self::reserve_quota
    fn settle_quota<'a>(
        &'a self,
        tenant_id: &'a str,
        user_id: &'a str,
        day: u32,
        estimate: u64,
        actual: u64,
    ) -> BoxFuture<'a, bool>;

    /// `user`'s shared counter for `day`; `None` when the bus cannot tell.
    fn quota_count<'a>(
        &'a self,
        tenant_id: &'a str,
        user_id: &'a str,
        day: u32,
    ) -> BoxFuture<'a, Option<QuotaCount>>;

    /// Health for `/readyz`.
    fn health(&self) -> Health;

    /// Leaves the cluster (shutdown): others see this instance gone at once.
    fn leave(&self) -> BoxFuture<'_, ()>;
}

/// This instance's node id: the configured one, else `FLY_MACHINE_ID`,
/// else a fresh random one.
pub fn node_id(config: &Config) -> String {
    if !config.cluster.node_id.is_empty() {
        return config.cluster.node_id.clone();
    }
    if let Ok(machine) = std::env::var("FLY_MACHINE_ID")
        && !machine.is_empty()
        && machine.len() <= 64
        && machine.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return machine;
    }
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("n{}", &id[..12])
}

/// The bus `config` asks for: Redis when `cluster.redis_url` is set
/// (connecting in the background), else the in-process one.
pub fn open(config: &Config) -> Arc<dyn Bus> {
    let node = node_id(config);
    if config.cluster.redis_url.is_empty() {
        Arc::new(LocalBus::new(node, config))
    } else {
        RedisBus::start(config, node)
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    crate::store::now_ms().try_into().unwrap_or(0)
}
