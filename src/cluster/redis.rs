//! The Redis bus: pub/sub fan-out, presence sets, node heartbeats, reply
//! streams with their meta hash, and idempotency records.
//!
//! One [`ConnectionManager`] (RESP3, reconnecting by itself) carries every
//! command and the pub/sub pushes. Pushes land in a bounded queue (overflow
//! counted) and one dispatcher routes them: room channels to the chat
//! service, reply channels to their followers, this node's control channel
//! to cancellations. Outgoing events go through another bounded queue and
//! one publisher task, so they leave in order and a slow or absent Redis
//! never holds up a connection.
//!
//! Key layout (hash tags keep each conversation's and each reply's keys in
//! one Redis Cluster slot):
//!
//! | key | type | TTL |
//! | --- | --- | --- |
//! | `spl:{c:<conversation>}:events` | pub/sub channel | — |
//! | `spl:{c:<conversation>}:members` | zset `instance\|presence id\|user` → expiry ms | 3 heartbeats |
//! | `spl:{c:<conversation>}:sent:<client message id>` | string | `sent_ttl_secs` |
//! | `spl:{g:<generation>}:log` | stream, entry `1-<first offset>` → `e` (JSON events) | `stream_ttl_secs`, then the resume window |
//! | `spl:{g:<generation>}:meta` | hash: epoch, node, instance, owner, top, status | same |
//! | `spl:{g:<generation>}:live` | pub/sub channel of batches | — |
//! | `spl:{s:<session>}` | string: the session (JSON) | `chat.session_ttl_secs` |
//! | `spl:{u:<tenant>:<user>}:active` | hash: generation → running reply (JSON) | `stream_ttl_secs` |
//! | `spl:nodes` | zset `node@epoch` → expiry ms | entries pruned after an hour |
//! | `spl:{rl:<kind>:<principal>}` | string: GCRA theoretical arrival time (µs, Redis `TIME`) | until the budget is full again |
//! | `spl:{q:<tenant>:<user>}:<yyyymmdd>` | hash: used, reserved (tokens) | two days |
//! | `spl:node:<node@epoch>` | pub/sub control channel | — |

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{PushInfo, PushKind, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::wire::{decode_events, encode_events};
use super::{
    Active, Bus, Claim, ClusterError, Health, Inbound, MemberKey, QuotaCount, QuotaDecision,
    RateDecision, Refreshed, RoomEvent, Session, decode_outcome, encode_outcome, now_ms,
};
use crate::config::{ClusterConfig, Config};
use crate::generation::{Generation, GenerationId, Outcome, PersistTo, ReplicaSpec};
use crate::provider::{ErrorClass, ProviderError};
use crate::store::Owner;

/// Events per stream entry, at most.
const BATCH_EVENTS: usize = 256;
/// Payload bytes per stream entry, about.
const BATCH_BYTES: usize = 64 * 1024;
/// Entries read per XRANGE page.
const PAGE: usize = 128;
/// Live batches queued per follower before it falls back to a position
/// check.
const FOLLOWER_QUEUE: usize = 64;
/// How long a send stays claimed while it is stored and started.
const CLAIM_MS: u64 = 30_000;

/// Appends one batch to a reply's stream, moves the meta hash's top (and
/// terminal status), refreshes the TTLs and publishes the batch, unless the
/// stream's top is not where the batch starts: then it returns the top so
/// the writer can catch up (Redis lost data) or skip ahead.
const APPEND: &str = r#"
local top = 0
local t = redis.call('HGET', KEYS[2], 'top')
if t then top = tonumber(t) end
local first = tonumber(ARGV[1])
if top ~= first then return top end
local n = tonumber(ARGV[2])
if n > 0 then
  redis.call('XADD', KEYS[1], '1-' .. ARGV[1], 'e', ARGV[3])
end
local new_top = first + n
if first == 0 then
  redis.call('HSET', KEYS[2], 'epoch', ARGV[7], 'node', ARGV[8], 'instance', ARGV[9],
    'tenant', ARGV[10], 'user', ARGV[11], 'conversation', ARGV[12], 'model', ARGV[13],
    'created', ARGV[14])
end
redis.call('HSET', KEYS[2], 'top', new_top, 'status', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
local status = 'null'
if ARGV[4] ~= '' then status = ARGV[4] end
redis.call('PUBLISH', ARGV[6], '{"first":' .. first .. ',"top":' .. new_top ..
  ',"status":' .. status .. ',"events":' .. ARGV[3] .. '}')
return new_top
"#;

/// GCRA for a fleet-wide rate budget, on Redis's clock so every instance
/// agrees: a burst of ARGV[1] (per minute) cells replenishing one every
/// `60 s / ARGV[1]` (whole µs, as governor does in ns). Counts ARGV[2]
/// cells if they conform. Returns `{allowed, remaining, retry µs, reset
/// µs}`; the key lives until the budget is full again.
const GCRA: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local per = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local interval = math.floor(60000000 / per)
local window = interval * per
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + cost * interval
if new_tat - now > window then
  return {0, 0, new_tat - now - window, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
  math.floor((new_tat - now) / 1000) + 1000)
return {1, math.floor((window - (new_tat - now)) / interval), 0, new_tat - now}
"#;

/// Reserves ARGV[2] tokens of a user's day (quota ARGV[1]) under the rule
/// of `limits::quota::admits`: refused once the day is spent, or while
/// reservations in flight leave too little; with none in flight, admitted
/// while the day is not spent. Returns `{admitted, used, reserved}`.
const QUOTA_RESERVE: &str = r#"
local used = tonumber(redis.call('HGET', KEYS[1], 'used') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local quota = tonumber(ARGV[1])
local estimate = tonumber(ARGV[2])
if used >= quota or (reserved > 0 and used + reserved + estimate > quota) then
  return {0, used, reserved}
end
reserved = redis.call('HINCRBY', KEYS[1], 'reserved', estimate)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, used, reserved}
"#;

/// Moves a reservation of ARGV[1] tokens to ARGV[2] used (a reservation
/// Redis forgot, after a restart, leaves `reserved` at 0, not below).
const QUOTA_SETTLE: &str = r#"
local reserved = redis.call('HINCRBY', KEYS[1], 'reserved', 0 - tonumber(ARGV[1]))
if reserved < 0 then redis.call('HSET', KEYS[1], 'reserved', 0) end
local used = redis.call('HINCRBY', KEYS[1], 'used', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return used
"#;

/// Seconds a day's token counter lives: the day, and a margin for
/// replies that settle after midnight and instances whose clocks differ.
const QUOTA_TTL_SECS: u64 = 2 * 86_400;

fn rate_key(key: &str) -> String {
    format!("spl:{{rl:{key}}}")
}

fn quota_key(tenant_id: &str, user_id: &str, day: u32) -> String {
    format!("spl:{{q:{tenant_id}:{user_id}}}:{day}")
}

fn room_channel(conversation_id: &str) -> String {
    format!("spl:{{c:{conversation_id}}}:events")
}

fn members_key(conversation_id: &str) -> String {
    format!("spl:{{c:{conversation_id}}}:members")
}

fn sent_key(conversation_id: &str, client_message_id: &str) -> String {
    format!("spl:{{c:{conversation_id}}}:sent:{client_message_id}")
}

fn log_key(id: GenerationId) -> String {
    format!("spl:{{g:{id}}}:log")
}

fn meta_key(id: GenerationId) -> String {
    format!("spl:{{g:{id}}}:meta")
}

fn live_channel(id: GenerationId) -> String {
    format!("spl:{{g:{id}}}:live")
}

const NODES: &str = "spl:nodes";

fn session_key(id: &str) -> String {
    format!("spl:{{s:{id}}}")
}

fn active_key(tenant_id: &str, user_id: &str) -> String {
    format!("spl:{{u:{tenant_id}:{user_id}}}:active")
}

fn control_channel(instance: &str) -> String {
    format!("spl:node:{instance}")
}

/// A room event on its channel, with who published it.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    instance: String,
    /// When it was published (Unix µs), for the pub/sub lag metric.
    #[serde(default)]
    sent_us: u64,
    conversation_id: String,
    event: RoomEvent,
}

/// A message on a node's control channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Control {
    Cancel { generation_id: GenerationId },
}

/// A published batch of a reply's log.
#[derive(Debug, Deserialize)]
struct Batch {
    first: u64,
    top: u64,
    status: Option<serde_json::Value>,
    events: serde_json::Value,
}

/// What the publisher task does, in order.
#[derive(Debug)]
enum Outgoing {
    Publish {
        channel: String,
        payload: String,
        /// Presence bookkeeping that must happen before the publish.
        presence: Option<(String, String, bool)>,
    },
    Subscribe(String, Option<oneshot::Sender<bool>>),
    Unsubscribe(String),
    Set {
        key: String,
        value: String,
        ttl_secs: u64,
    },
    Delete(String),
    /// A reply's meta hash, written before the reply is announced (the
    /// announcement follows in the same queue), so an instance that hears
    /// of the reply always finds it.
    Announce(Arc<Generation>),
}

/// A follower's inbox.
#[derive(Debug)]
struct Inbox {
    batches: mpsc::Sender<String>,
    /// Set when a batch was dropped: check the position now.
    behind: Arc<AtomicBool>,
}

/// State shared by the bus's tasks.
#[derive(Debug)]
struct Shared {
    node: String,
    instance: String,
    config: ClusterConfig,
    max_frame_bytes: usize,
    max_reply_bytes: usize,
    resume_window_secs: u64,
    session_ttl_secs: u64,
    /// How long an unwatched replica keeps following.
    replica_grace: Duration,
    conn: OnceLock<ConnectionManager>,
    /// Whether the last command worked.
    connected: AtomicBool,
    /// Unix ms since when the connection has been up (0: down).
    up_since: AtomicU64,
    inbound: mpsc::Sender<Inbound>,
    inbound_rx: Mutex<Option<mpsc::Receiver<Inbound>>>,
    outgoing: mpsc::Sender<Outgoing>,
    /// Room channels this instance wants (re-subscribed after an outage).
    rooms: Mutex<HashSet<String>>,
    /// Followers by their reply channel.
    inboxes: Mutex<HashMap<String, Inbox>>,
    /// Replicas being followed.
    replicas: Mutex<HashMap<GenerationId, Arc<Generation>>>,
    /// Serializes follower set-up (one replica per reply).
    following: tokio::sync::Mutex<()>,
    /// Live instances seen at the last refresh.
    live: Mutex<HashSet<String>>,
    /// Instances whose heartbeat had lapsed at the last refresh.
    dead: Mutex<HashSet<String>>,
    dropped_inbound: AtomicU64,
    dropped_outbound: AtomicU64,
    recovered: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The Redis-backed bus.
#[derive(Debug)]
pub struct RedisBus {
    shared: Arc<Shared>,
    /// The reply mirrors running, waited for when the instance leaves.
    mirrors: tokio_util::task::TaskTracker,
}

impl RedisBus {
    /// Starts the bus: connects in the background (retrying until Redis
    /// answers), then runs the dispatcher and publisher tasks. Usable at
    /// once; until connected it reports itself down and degrades.
    pub fn start(config: &Config, node: String) -> Arc<Self> {
        let (inbound, inbound_rx) = mpsc::channel(config.cluster.inbound_capacity);
        let (outgoing, outgoing_rx) = mpsc::channel(config.cluster.outbound_capacity);
        let instance = format!("{node}@{}", crate::generation::epoch());
        let shared = Arc::new(Shared {
            node,
            instance,
            config: config.cluster.clone(),
            max_frame_bytes: config.generation.max_frame_bytes,
            max_reply_bytes: config.generation.max_reply_bytes,
            resume_window_secs: config.generation.resume_window_secs.max(1),
            session_ttl_secs: config.chat.session_ttl_secs.max(1),
            replica_grace: Duration::from_secs(config.generation.grace_secs.max(1)),
            conn: OnceLock::new(),
            connected: AtomicBool::new(false),
            up_since: AtomicU64::new(0),
            inbound,
            inbound_rx: Mutex::new(Some(inbound_rx)),
            outgoing,
            rooms: Mutex::new(HashSet::new()),
            inboxes: Mutex::new(HashMap::new()),
            replicas: Mutex::new(HashMap::new()),
            following: tokio::sync::Mutex::new(()),
            live: Mutex::new(HashSet::new()),
            dead: Mutex::new(HashSet::new()),
            dropped_inbound: AtomicU64::new(0),
            dropped_outbound: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
        });
        tokio::spawn(connect(Arc::clone(&shared), outgoing_rx));
        tracing::info!(node = %shared.node, instance = %shared.instance, "cluster bus: redis");
        Arc::new(Self {
            shared,
            mirrors: tokio_util::task::TaskTracker::new(),
        })
    }
}

/// How long leaving waits for reply mirrors to write their last batches.
const MIRROR_FLUSH: Duration = Duration::from_secs(5);

/// Connects (retrying), then runs the dispatcher and the publisher.
async fn connect(shared: Arc<Shared>, outgoing: mpsc::Receiver<Outgoing>) {
    let (push_tx, push_rx) = mpsc::channel::<PushInfo>(shared.config.inbound_capacity);
    let dropped = Arc::clone(&shared);
    let sender = move |info: PushInfo| -> Result<(), ()> {
        match push_tx.try_send(info) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                dropped.dropped_inbound.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        }
    };
    let timeout = Duration::from_millis(shared.config.command_timeout_ms);
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
        .set_automatic_resubscription()
        .set_push_sender(sender);
    let url = with_resp3(&shared.config.redis_url);
    // Events are small writes that must leave at once: no Nagle delay.
    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).map(|info| {
        let tcp = info.tcp_settings().clone().set_nodelay(true);
        info.set_tcp_settings(tcp)
    });
    let client = match info.and_then(redis::Client::open) {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(%err, "cluster.redis_url is not a usable Redis URL");
            return;
        }
    };
    let mut delay = Duration::from_millis(100);
    let manager = loop {
        match ConnectionManager::new_with_config(client.clone(), manager_config.clone()).await {
            Ok(manager) => break manager,
            Err(err) => {
                tracing::warn!(%err, "redis unreachable; running degraded, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    };
    if shared.conn.set(manager).is_err() {
        return;
    }
    shared.mark(true);
    tracing::info!("redis connected");
    // Announce this instance at once, not at the next heartbeat, so others
    // never see its members before it.
    if let Some(mut conn) = shared.conn() {
        let expiry = now_ms() + 3 * shared.config.heartbeat_ms;
        let mut pipe = redis::pipe();
        pipe.zadd(NODES, &shared.instance, expiry).ignore();
        shared.run(pipe.query_async::<()>(&mut conn)).await;
    }
    tokio::spawn(publisher(Arc::clone(&shared), outgoing));
    tokio::spawn(dispatcher(Arc::clone(&shared), push_rx));
    // This node's control channel.
    let control = control_channel(&shared.instance);
    lock(&shared.rooms).insert(control.clone());
    drop(shared.outgoing.try_send(Outgoing::Subscribe(control, None)));
}

/// Adds `protocol=resp3` to a Redis URL (pushes need it).
fn with_resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

impl Shared {
    fn conn(&self) -> Option<ConnectionManager> {
        self.conn.get().cloned()
    }

    /// Records whether Redis answered; on a return after an outage,
    /// re-subscribes every channel this instance wants.
    fn mark(self: &Arc<Self>, ok: bool) {
        let was = self.connected.swap(ok, Ordering::Relaxed);
        if ok && !was {
            self.up_since.store(now_ms(), Ordering::Relaxed);
            tracing::info!("redis reachable");
            let mut channels: Vec<String> = lock(&self.rooms).iter().cloned().collect();
            channels.extend(lock(&self.inboxes).keys().cloned());
            for channel in channels {
                drop(self.outgoing.try_send(Outgoing::Subscribe(channel, None)));
            }
        } else if !ok && was {
            self.up_since.store(0, Ordering::Relaxed);
            tracing::warn!("redis unreachable: cross-instance features degraded");
        }
    }

    fn is_up(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && self.conn.get().is_some()
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.command_timeout_ms)
    }

    /// Runs one command (or pipeline) within the command timeout, and
    /// records whether Redis answered.
    async fn run<T, F>(self: &Arc<Self>, work: F) -> Option<T>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match tokio::time::timeout(self.timeout(), work).await {
            Ok(Ok(value)) => {
                self.mark(true);
                Some(value)
            }
            Ok(Err(err)) => {
                if err.is_io_error()
                    || err.is_connection_dropped()
                    || err.is_timeout()
                    || err.is_connection_refusal()
                {
                    self.mark(false);
                } else {
                    tracing::warn!(%err, "redis command failed");
                }
                None
            }
            Err(_) => {
                self.mark(false);
                None
            }
        }
    }

    /// Whether an instance is alive: its heartbeat was current at the last
    /// refresh. One whose heartbeat lapsed is dead; one never seen (just
    /// started, or Redis has just come back empty and heartbeats are being
    /// rewritten) is given three heartbeats after (re)connecting.
    fn alive(&self, instance: &str) -> bool {
        if instance == self.instance || lock(&self.live).contains(instance) {
            return true;
        }
        if lock(&self.dead).contains(instance) {
            return false;
        }
        let up_since = self.up_since.load(Ordering::Relaxed);
        let settle = 3 * self.config.heartbeat_ms;
        up_since == 0 || now_ms().saturating_sub(up_since) < settle
    }

    fn enqueue(&self, item: Outgoing) {
        if self.outgoing.try_send(item).is_err() {
            self.dropped_outbound.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Drains the outgoing queue in order. While Redis is known to be down,
/// publishes are dropped (counted) rather than queued behind timeouts;
/// subscriptions are redone when it returns.
async fn publisher(shared: Arc<Shared>, mut outgoing: mpsc::Receiver<Outgoing>) {
    let Some(mut conn) = shared.conn() else {
        return;
    };
    let ttl_ms = 3 * shared.config.heartbeat_ms;
    while let Some(item) = outgoing.recv().await {
        match item {
            Outgoing::Publish {
                channel,
                payload,
                presence,
            } => {
                if !shared.is_up() {
                    shared.dropped_outbound.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let mut pipe = redis::pipe();
                if let Some((key, member, present)) = presence {
                    if present {
                        pipe.zadd(&key, &member, now_ms() + ttl_ms).ignore();
                        pipe.pexpire(&key, i64::try_from(ttl_ms).unwrap_or(i64::MAX))
                            .ignore();
                    } else {
                        pipe.zrem(&key, &member).ignore();
                    }
                }
                pipe.publish(&channel, &payload).ignore();
                if shared
                    .run(pipe.query_async::<()>(&mut conn))
                    .await
                    .is_none()
                {
                    shared.dropped_outbound.fetch_add(1, Ordering::Relaxed);
                }
            }
            Outgoing::Subscribe(channel, done) => {
                // Subscribe only what is still wanted (an unsubscribe may
                // have overtaken it).
                let wanted = lock(&shared.rooms).contains(&channel)
                    || lock(&shared.inboxes).contains_key(&channel);
                let ok = if wanted {
                    shared.run(conn.subscribe(&channel)).await.is_some()
                } else {
                    true
                };
                if let Some(done) = done {
                    done.send(ok).ok();
                }
            }
            Outgoing::Unsubscribe(channel) => {
                let wanted = lock(&shared.rooms).contains(&channel)
                    || lock(&shared.inboxes).contains_key(&channel);
                if !wanted && shared.is_up() {
                    shared.run(conn.unsubscribe(&channel)).await;
                }
            }
            Outgoing::Set {
                key,
                value,
                ttl_secs,
            } => {
                if shared.is_up() {
                    let mut pipe = redis::pipe();
                    pipe.set_ex(&key, &value, ttl_secs).ignore();
                    shared.run(pipe.query_async::<()>(&mut conn)).await;
                }
            }
            Outgoing::Announce(generation) => {
                if shared.is_up() {
                    append(&shared, &mut conn, &generation, 0, &[], None).await;
                    set_active(&shared, &mut conn, &generation, true).await;
                }
            }
            Outgoing::Delete(key) => {
                if shared.is_up() {
                    let mut pipe = redis::pipe();
                    pipe.del(&key).ignore();
                    shared.run(pipe.query_async::<()>(&mut conn)).await;
                }
            }
        }
    }
}

/// Routes pushed messages: room events to the chat service, reply batches
/// to their followers, control messages to this node.
async fn dispatcher(shared: Arc<Shared>, mut pushes: mpsc::Receiver<PushInfo>) {
    let control = control_channel(&shared.instance);
    while let Some(push) = pushes.recv().await {
        match push.kind {
            PushKind::Disconnection => {
                shared.mark(false);
                continue;
            }
            PushKind::Message | PushKind::SMessage => {}
            _ => continue,
        }
        let mut data = push.data.into_iter();
        let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
            continue;
        };
        let (Some(channel), Some(payload)) = (text(channel), text(payload)) else {
            continue;
        };
        if channel == control {
            if let Ok(Control::Cancel { generation_id }) = serde_json::from_str(&payload)
                && shared
                    .inbound
                    .try_send(Inbound::Cancel { generation_id })
                    .is_err()
            {
                shared.dropped_inbound.fetch_add(1, Ordering::Relaxed);
            }
        } else if channel.ends_with(":live") {
            let inboxes = lock(&shared.inboxes);
            if let Some(inbox) = inboxes.get(&channel)
                && inbox.batches.try_send(payload).is_err()
            {
                inbox.behind.store(true, Ordering::Relaxed);
            }
        } else if channel.ends_with(":events") {
            let Ok(envelope) = serde_json::from_str::<Envelope>(&payload) else {
                tracing::warn!("unreadable room event on the bus");
                continue;
            };
            if envelope.instance == shared.instance {
                continue;
            }
            if envelope.sent_us > 0 {
                let lag_us = crate::metrics::unix_micros().saturating_sub(envelope.sent_us);
                crate::metrics::get()
                    .redis_pubsub_lag
                    .observe(lag_us as f64 / 1e6);
            }
            let inbound = Inbound::Room {
                instance: envelope.instance,
                conversation_id: envelope.conversation_id,
                event: envelope.event,
            };
            if shared.inbound.try_send(inbound).is_err() {
                shared.dropped_inbound.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn text(value: Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
        Value::SimpleString(text) => Some(text),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

impl Bus for RedisBus {
    fn node(&self) -> &str {
        &self.shared.node
    }

    fn instance(&self) -> &str {
        &self.shared.instance
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn inbound(&self) -> Option<mpsc::Receiver<Inbound>> {
        lock(&self.shared.inbound_rx).take()
    }

    fn publish(&self, conversation_id: &str, event: RoomEvent) {
        let presence = match &event {
            RoomEvent::Join {
                connection,
                user_id,
            } => Some((
                members_key(conversation_id),
                format!("{}|{connection}|{user_id}", self.shared.instance),
                true,
            )),
            RoomEvent::Leave {
                connection,
                user_id,
            } => Some((
                members_key(conversation_id),
                format!("{}|{connection}|{user_id}", self.shared.instance),
                false,
            )),
            _ => None,
        };
        let envelope = Envelope {
            instance: self.shared.instance.clone(),
            sent_us: crate::metrics::unix_micros(),
            conversation_id: conversation_id.to_owned(),
            event,
        };
        let Ok(payload) = serde_json::to_string(&envelope) else {
            return;
        };
        self.shared.enqueue(Outgoing::Publish {
            channel: room_channel(conversation_id),
            payload,
            presence,
        });
    }

    fn open_room<'a>(
        &'a self,
        conversation_id: &'a str,
    ) -> BoxFuture<'a, HashMap<MemberKey, String>> {
        async move {
            let shared = &self.shared;
            let channel = room_channel(conversation_id);
            lock(&shared.rooms).insert(channel.clone());
            if !shared.is_up() {
                return HashMap::new();
            }
            // Subscribe first, then read the members: a join published in
            // between is seen twice (harmless), never missed.
            let (done, subscribed) = oneshot::channel();
            shared.enqueue(Outgoing::Subscribe(channel, Some(done)));
            let subscribed = tokio::time::timeout(shared.timeout(), subscribed).await;
            if !matches!(subscribed, Ok(Ok(true))) {
                return HashMap::new();
            }
            let Some(mut conn) = shared.conn() else {
                return HashMap::new();
            };
            let key = members_key(conversation_id);
            let members: Option<Vec<String>> = shared
                .run(
                    redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(now_ms())
                        .arg("+inf")
                        .arg("BYSCORE")
                        .query_async(&mut conn),
                )
                .await;
            members
                .unwrap_or_default()
                .iter()
                .filter_map(|m| parse_member(m))
                .filter(|(key, _)| key.instance != shared.instance && shared.alive(&key.instance))
                .collect()
        }
        .boxed()
    }

    fn close_room(&self, conversation_id: &str) {
        let channel = room_channel(conversation_id);
        lock(&self.shared.rooms).remove(&channel);
        self.shared.enqueue(Outgoing::Unsubscribe(channel));
    }

    fn refresh<'a>(
        &'a self,
        local: &'a [(String, Vec<(u64, String)>)],
    ) -> BoxFuture<'a, Option<Refreshed>> {
        async move {
            let shared = &self.shared;
            let mut conn = shared.conn()?;
            let now = now_ms();
            let ttl_ms = 3 * shared.config.heartbeat_ms;
            let expiry = now + ttl_ms;
            let mut pipe = redis::pipe();
            pipe.zadd(NODES, &shared.instance, expiry).ignore();
            pipe.expire(NODES, 7_200).ignore();
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(NODES)
                .arg("-inf")
                .arg(now.saturating_sub(3_600_000))
                .ignore();
            for (conversation_id, members) in local {
                let key = members_key(conversation_id);
                for (connection, user) in members {
                    pipe.zadd(
                        &key,
                        format!("{}|{connection}|{user}", shared.instance),
                        expiry,
                    )
                    .ignore();
                }
                pipe.cmd("ZREMRANGEBYSCORE")
                    .arg(&key)
                    .arg("-inf")
                    .arg(now)
                    .ignore();
                pipe.pexpire(&key, i64::try_from(ttl_ms).unwrap_or(i64::MAX))
                    .ignore();
                pipe.cmd("ZRANGE")
                    .arg(&key)
                    .arg(now)
                    .arg("+inf")
                    .arg("BYSCORE");
            }
            pipe.cmd("ZRANGE")
                .arg(NODES)
                .arg(now)
                .arg("+inf")
                .arg("BYSCORE");
            pipe.cmd("ZRANGE")
                .arg(NODES)
                .arg("-inf")
                .arg(format!("({now}"))
                .arg("BYSCORE");
            let mut replies: Vec<Vec<String>> = shared.run(pipe.query_async(&mut conn)).await?;
            let dead: HashSet<String> = replies.pop().unwrap_or_default().into_iter().collect();
            let live: HashSet<String> = replies.pop().unwrap_or_default().into_iter().collect();
            *lock(&shared.live) = live.clone();
            *lock(&shared.dead) = dead.clone();
            let mut rooms = HashMap::new();
            for ((conversation_id, _), members) in local.iter().zip(replies) {
                // Members of instances not known to be dead: one that has
                // just started may not have written its heartbeat yet.
                let others: HashMap<MemberKey, String> = members
                    .iter()
                    .filter_map(|m| parse_member(m))
                    .filter(|(key, _)| {
                        key.instance != shared.instance && !dead.contains(&key.instance)
                    })
                    .collect();
                rooms.insert(conversation_id.clone(), others);
            }
            Some(Refreshed { live, dead, rooms })
        }
        .boxed()
    }

    fn mirror(&self, generation: &Arc<Generation>) {
        self.shared
            .enqueue(Outgoing::Announce(Arc::clone(generation)));
        self.mirrors
            .spawn(mirror(Arc::clone(&self.shared), Arc::clone(generation)));
    }

    fn follow(
        &self,
        id: GenerationId,
    ) -> BoxFuture<'_, Result<Option<Arc<Generation>>, ClusterError>> {
        follow(Arc::clone(&self.shared), id).boxed()
    }

    fn cancel_remote(&self, generation: &Generation) {
        let Some(instance) = generation.origin() else {
            return;
        };
        let Ok(payload) = serde_json::to_string(&Control::Cancel {
            generation_id: generation.id(),
        }) else {
            return;
        };
        self.shared.enqueue(Outgoing::Publish {
            channel: control_channel(instance),
            payload,
            presence: None,
        });
    }

    fn claim_send<'a>(
        &'a self,
        conversation_id: &'a str,
        client_message_id: &'a str,
    ) -> BoxFuture<'a, Claim> {
        async move {
            let shared = &self.shared;
            if !shared.is_up() {
                return Claim::Fresh;
            }
            let Some(mut conn) = shared.conn() else {
                return Claim::Fresh;
            };
            let key = sent_key(conversation_id, client_message_id);
            let claimed: Option<Option<String>> = shared
                .run(
                    redis::cmd("SET")
                        .arg(&key)
                        .arg("pending")
                        .arg("NX")
                        .arg("PX")
                        .arg(CLAIM_MS)
                        .arg("GET")
                        .query_async(&mut conn),
                )
                .await;
            match claimed {
                // Redis away: the local memory is all there is.
                None | Some(None) => Claim::Fresh,
                Some(Some(value)) if value == "pending" => Claim::InProgress,
                Some(Some(value)) => match value.split_once('|') {
                    Some((message_id, generation_id)) => Claim::Sent {
                        message_id: message_id.to_owned(),
                        generation_id: generation_id.to_owned(),
                    },
                    None => Claim::Fresh,
                },
            }
        }
        .boxed()
    }

    fn record_send(
        &self,
        conversation_id: &str,
        client_message_id: &str,
        message_id: &str,
        generation_id: &str,
    ) {
        self.shared.enqueue(Outgoing::Set {
            key: sent_key(conversation_id, client_message_id),
            value: format!("{message_id}|{generation_id}"),
            ttl_secs: self.shared.config.sent_ttl_secs,
        });
    }

    fn release_send(&self, conversation_id: &str, client_message_id: &str) {
        self.shared.enqueue(Outgoing::Delete(sent_key(
            conversation_id,
            client_message_id,
        )));
    }

    fn save_session(&self, session: &Session) {
        let Ok(value) = serde_json::to_string(session) else {
            return;
        };
        self.shared.enqueue(Outgoing::Set {
            key: session_key(&session.id),
            value,
            ttl_secs: self.shared.session_ttl_secs,
        });
    }

    fn load_session<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Session>> {
        async move {
            let shared = &self.shared;
            if !shared.is_up() {
                return None;
            }
            let mut conn = shared.conn()?;
            let value: Option<String> = shared
                .run(
                    redis::cmd("GET")
                        .arg(session_key(id))
                        .query_async(&mut conn),
                )
                .await?;
            serde_json::from_str(&value?).ok()
        }
        .boxed()
    }

    fn active<'a>(&'a self, tenant_id: &'a str, user_id: &'a str) -> BoxFuture<'a, Vec<Active>> {
        async move {
            let shared = &self.shared;
            let Some(mut conn) = shared.conn().filter(|_| shared.is_up()) else {
                return Vec::new();
            };
            let entries: Option<HashMap<String, String>> = shared
                .run(
                    redis::cmd("HGETALL")
                        .arg(active_key(tenant_id, user_id))
                        .query_async(&mut conn),
                )
                .await;
            let mut active: Vec<Active> = entries
                .unwrap_or_default()
                .values()
                .filter_map(|json| serde_json::from_str::<Active>(json).ok())
                .filter(|a| a.instance != shared.instance && shared.alive(&a.instance))
                .collect();
            active.sort_by(|a, b| a.generation_id.cmp(&b.generation_id));
            active
        }
        .boxed()
    }

    fn rate_limit<'a>(
        &'a self,
        key: &'a str,
        per_minute: u32,
        cost: u32,
    ) -> BoxFuture<'a, Option<RateDecision>> {
        async move {
            static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
            let shared = &self.shared;
            let mut conn = shared.conn().filter(|_| shared.is_up())?;
            let script = SCRIPT.get_or_init(|| redis::Script::new(GCRA));
            let mut invocation = script.key(rate_key(key));
            invocation.arg(per_minute.max(1)).arg(cost);
            let (allowed, remaining, retry_us, reset_us): (i64, i64, i64, i64) =
                shared.run(invocation.invoke_async(&mut conn)).await?;
            let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
            Some(RateDecision {
                allowed: allowed == 1,
                remaining: u32::try_from(remaining.max(0)).unwrap_or(u32::MAX),
                retry_after: micros(retry_us),
                reset: micros(reset_us),
            })
        }
        .boxed()
    }

    fn reserve_quota<'a>(
        &'a self,
        tenant_id: &'a str,
        user_id: &'a str,
        day: u32,
        quota: u64,
        estimate: u64,
    ) -> BoxFuture<'a, Option<QuotaDecision>> {
        async move {
            static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
            let shared = &self.shared;
            let mut conn = shared.conn().filter(|_| shared.is_up())?;
            let script = SCRIPT.get_or_init(|| redis::Script::new(QUOTA_RESERVE));
            let mut invocation = script.key(quota_key(tenant_id, user_id, day));
            invocation.arg(quota).arg(estimate).arg(QUOTA_TTL_SECS);
            let (admitted, used, reserved): (i64, u64, u64) =
                shared.run(invocation.invoke_async(&mut conn)).await?;
            Some(QuotaDecision {
                admitted: admitted == 1,
                count: QuotaCount { used, reserved },
            })
        }
        .boxed()
    }

    fn settle_quota<'a>(
        &'a self,
        tenant_id: &'a str,
        user_id: &'a str,
        day: u32,
        estimate: u64,
        actual: u64,
    ) -> BoxFuture<'a, bool> {
        async move {
            static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
            let shared = &self.shared;
            let Some(mut conn) = shared.conn().filter(|_| shared.is_up()) else {
                return false;
            };
            let script = SCRIPT.get_or_init(|| redis::Script::new(QUOTA_SETTLE));
            let mut invocation = script.key(quota_key(tenant_id, user_id, day));
            invocation.arg(estimate).arg(actual).arg(QUOTA_TTL_SECS);
            shared
                .run(invocation.invoke_async::<u64>(&mut conn))
                .await
                .is_some()
        }
        .boxed()
    }

    fn quota_count<'a>(
        &'a self,
        tenant_id: &'a str,
        user_id: &'a str,
        day: u32,
    ) -> BoxFuture<'a, Option<QuotaCount>> {
        async move {
            let shared = &self.shared;
            let mut conn = shared.conn().filter(|_| shared.is_up())?;
            let (used, reserved): (Option<u64>, Option<u64>) = shared
                .run(
                    redis::cmd("HMGET")
                        .arg(quota_key(tenant_id, user_id, day))
                        .arg("used")
                        .arg("reserved")
                        .query_async(&mut conn),
                )
                .await?;
            Some(QuotaCount {
                used: used.unwrap_or(0),
                reserved: reserved.unwrap_or(0),
            })
        }
        .boxed()
    }

    fn health(&self) -> Health {
        let shared = &self.shared;
        Health {
            mode: "redis",
            node: shared.node.clone(),
            ok: shared.is_up(),
            dropped_inbound: shared.dropped_inbound.load(Ordering::Relaxed),
            dropped_outbound: shared.dropped_outbound.load(Ordering::Relaxed),
            recovered: shared.recovered.load(Ordering::Relaxed),
            followers: lock(&shared.replicas).len(),
            instances: lock(&shared.live).len(),
        }
    }

    fn leave(&self) -> BoxFuture<'_, ()> {
        async move {
            // Replies that ended have their last batches (and terminal
            // status) written before this instance is gone; a mirror that
            // cannot reach Redis gives up at the deadline.
            self.mirrors.close();
            if tokio::time::timeout(MIRROR_FLUSH, self.mirrors.wait())
                .await
                .is_err()
            {
                tracing::warn!(
                    mirrors = self.mirrors.len(),
                    "reply mirrors still writing at exit"
                );
            }
            let shared = &self.shared;
            let Some(mut conn) = shared.conn() else {
                return;
            };
            if shared.is_up() {
                // Lapsed, not removed: the others take its members for gone
                // at their next refresh.
                let mut pipe = redis::pipe();
                pipe.zadd(NODES, &shared.instance, now_ms().saturating_sub(1))
                    .ignore();
                shared.run(pipe.query_async::<()>(&mut conn)).await;
            }
        }
        .boxed()
    }
}

/// `instance|connection|user` back as a member.
fn parse_member(member: &str) -> Option<(MemberKey, String)> {
    let mut parts = member.splitn(3, '|');
    let instance = parts.next()?.to_owned();
    let connection = parts.next()?.parse().ok()?;
    let user = parts.next()?.to_owned();
    Some((
        MemberKey {
            instance,
            connection,
        },
        user,
    ))
}

/// Appends `events` (starting at offset `first`) to `generation`'s stream
/// with the APPEND script, ending it with `terminal` when given; returns the
/// stream's top afterwards (or, when the batch did not start at the top,
/// the top as Redis has it), `None` when Redis did not answer.
async fn append(
    shared: &Arc<Shared>,
    conn: &mut ConnectionManager,
    generation: &Generation,
    first: u64,
    events: &[crate::provider::ProviderEvent],
    terminal: Option<&Outcome>,
) -> Option<u64> {
    static SCRIPT: OnceLock<redis::Script> = OnceLock::new();
    let script = SCRIPT.get_or_init(|| redis::Script::new(APPEND));
    let to = generation.persisted_to()?;
    let id = generation.id();
    let status = terminal.map(encode_outcome).unwrap_or_default();
    let ttl = if terminal.is_some() {
        shared.resume_window_secs
    } else {
        shared.config.stream_ttl_secs
    };
    let mut invocation = script.key(log_key(id));
    invocation
        .key(meta_key(id))
        .arg(first)
        .arg(events.len())
        .arg(encode_events(events))
        .arg(&status)
        .arg(ttl)
        .arg(live_channel(id))
        .arg(generation.epoch())
        .arg(&shared.node)
        .arg(&shared.instance)
        .arg(&to.owner.tenant_id)
        .arg(&to.owner.user_id)
        .arg(&to.conversation_id)
        .arg(generation.model())
        .arg(generation.created());
    shared.run(invocation.invoke_async::<u64>(conn)).await
}

/// Writes `generation`'s log to its stream in batches until it has ended
/// and its end is written. Redis away: retries with backoff (the log is in
/// memory, bounded); Redis lost the stream (restarted empty): rewrites it
/// from the start.
async fn mirror(shared: Arc<Shared>, generation: Arc<Generation>) {
    if generation.persisted_to().is_none() {
        return;
    }
    let id = generation.id();
    let mut cursor: u64 = 0;
    let mut written = false;
    let mut backoff = Duration::from_millis(50);
    let mut ended_at: Option<u64> = None;
    loop {
        let events = generation.events_from(cursor, BATCH_EVENTS, BATCH_BYTES);
        let count = events.len() as u64;
        let outcome = generation.outcome();
        let terminal = outcome.filter(|_| cursor + count == generation.len());
        if count == 0 && terminal.is_none() && written {
            generation.changed_past(cursor).await;
            continue;
        }
        let Some(mut conn) = shared.conn().filter(|_| shared.is_up()) else {
            if give_up(&shared, &generation, &mut ended_at) {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
            continue;
        };
        match append(
            &shared,
            &mut conn,
            &generation,
            cursor,
            &events,
            terminal.as_ref(),
        )
        .await
        {
            Some(top) if top == cursor + count => {
                cursor = top;
                written = true;
                backoff = Duration::from_millis(50);
                if terminal.is_some() {
                    set_active(&shared, &mut conn, &generation, false).await;
                    return;
                }
            }
            Some(top) => {
                // Redis holds another top: it restarted empty (top 0), so
                // write the log again from there.
                tracing::info!(generation = %id, top, cursor, "reply stream out of step; rewriting");
                cursor = top.min(generation.len());
                written = cursor > 0;
            }
            None => {
                if give_up(&shared, &generation, &mut ended_at) {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Lists (or, once it ended, unlists) `generation` among its user's
/// running replies.
async fn set_active(
    shared: &Arc<Shared>,
    conn: &mut ConnectionManager,
    generation: &Generation,
    running: bool,
) {
    let Some(to) = generation.persisted_to() else {
        return;
    };
    let key = active_key(&to.owner.tenant_id, &to.owner.user_id);
    let field = generation.id().to_string();
    let mut pipe = redis::pipe();
    if running {
        let active = Active {
            generation_id: field.clone(),
            conversation_id: to.conversation_id.clone(),
            epoch: generation.epoch(),
            instance: shared.instance.clone(),
            created: generation.created(),
        };
        let Ok(json) = serde_json::to_string(&active) else {
            return;
        };
        pipe.hset(&key, &field, json).ignore();
        pipe.expire(
            &key,
            i64::try_from(shared.config.stream_ttl_secs).unwrap_or(i64::MAX),
        )
        .ignore();
    } else {
        pipe.hdel(&key, &field).ignore();
    }
    shared.run(pipe.query_async::<()>(conn)).await;
}

/// Whether a mirror stops retrying: its reply ended longer ago than the
/// resume window (nobody can resume it any more).
fn give_up(shared: &Shared, generation: &Generation, ended_at: &mut Option<u64>) -> bool {
    if generation.outcome().is_none() {
        return false;
    }
    let now = now_ms();
    let since = *ended_at.get_or_insert(now);
    now.saturating_sub(since) > shared.resume_window_secs * 1000
}

/// The meta hash of a reply, read.
#[derive(Debug, Default)]
struct Meta {
    fields: HashMap<String, String>,
}

impl Meta {
    fn get(&self, field: &str) -> Option<&str> {
        self.fields.get(field).map(String::as_str)
    }

    fn number(&self, field: &str) -> Option<u64> {
        self.get(field)?.parse().ok()
    }

    fn status(&self) -> Option<&str> {
        self.get("status").filter(|s| !s.is_empty())
    }
}

async fn read_meta(shared: &Arc<Shared>, id: GenerationId) -> Option<Meta> {
    let mut conn = shared.conn()?;
    let fields: HashMap<String, String> = shared
        .run(
            redis::cmd("HGETALL")
                .arg(meta_key(id))
                .query_async(&mut conn),
        )
        .await?;
    Some(Meta { fields })
}

/// Sets up a replica of reply `id` and its follower task.
async fn follow(
    shared: Arc<Shared>,
    id: GenerationId,
) -> Result<Option<Arc<Generation>>, ClusterError> {
    if let Some(replica) = lock(&shared.replicas).get(&id) {
        return Ok(Some(Arc::clone(replica)));
    }
    if !shared.is_up() {
        return Err(ClusterError::Unavailable);
    }
    let _setup = shared.following.lock().await;
    if let Some(replica) = lock(&shared.replicas).get(&id) {
        return Ok(Some(Arc::clone(replica)));
    }
    if lock(&shared.replicas).len() >= shared.config.max_followers {
        return Err(ClusterError::Busy(shared.config.max_followers));
    }
    // Subscribe first, then read: a batch published in between arrives
    // twice (de-duplicated by offset), never not at all.
    let channel = live_channel(id);
    let (batches, inbox) = mpsc::channel(FOLLOWER_QUEUE);
    let behind = Arc::new(AtomicBool::new(false));
    lock(&shared.inboxes).insert(
        channel.clone(),
        Inbox {
            batches,
            behind: Arc::clone(&behind),
        },
    );
    let unfollow = |shared: &Arc<Shared>| {
        lock(&shared.inboxes).remove(&channel);
        shared.enqueue(Outgoing::Unsubscribe(channel.clone()));
    };
    let (done, subscribed) = oneshot::channel();
    shared.enqueue(Outgoing::Subscribe(channel.clone(), Some(done)));
    if !matches!(
        tokio::time::timeout(shared.timeout(), subscribed).await,
        Ok(Ok(true))
    ) {
        unfollow(&shared);
        return Err(ClusterError::Unavailable);
    }
    let Some(meta) = read_meta(&shared, id).await else {
        unfollow(&shared);
        return Err(ClusterError::Unavailable);
    };
    let (Some(epoch), Some(instance), Some(tenant), Some(user), Some(conversation)) = (
        meta.number("epoch"),
        meta.get("instance"),
        meta.get("tenant"),
        meta.get("user"),
        meta.get("conversation"),
    ) else {
        // No instance has (or had, within the TTL) this reply.
        unfollow(&shared);
        return Ok(None);
    };
    let spec = ReplicaSpec {
        id,
        epoch,
        origin: instance.to_owned(),
        model: meta.get("model").unwrap_or_default().to_owned(),
        persist_to: PersistTo {
            owner: Owner {
                tenant_id: tenant.to_owned(),
                user_id: user.to_owned(),
            },
            conversation_id: conversation.to_owned(),
        },
        created: meta.number("created").unwrap_or(0),
    };
    let replica = Generation::replica(spec, shared.max_frame_bytes, shared.max_reply_bytes);
    let mut follower = Follower {
        shared: Arc::clone(&shared),
        replica: Arc::clone(&replica),
        behind,
        missing_since: None,
    };
    if follower.catch_up(&meta).await.is_err() {
        unfollow(&shared);
        return Err(ClusterError::Unavailable);
    }
    lock(&shared.replicas).insert(id, Arc::clone(&replica));
    tokio::spawn(async move {
        follower.run(inbox).await;
        lock(&follower.shared.replicas).remove(&id);
        lock(&follower.shared.inboxes).remove(&live_channel(id));
        follower
            .shared
            .enqueue(Outgoing::Unsubscribe(live_channel(id)));
    });
    Ok(Some(replica))
}

/// Keeps a replica in step with its stream.
#[derive(Debug)]
struct Follower {
    shared: Arc<Shared>,
    replica: Arc<Generation>,
    behind: Arc<AtomicBool>,
    /// Since when (Unix ms) the meta hash has been missing.
    missing_since: Option<u64>,
}

/// Redis did not answer.
#[derive(Debug)]
struct Unreachable;

impl Follower {
    /// Follows live batches, checking the position every
    /// `position_check_ms`, until the replica ends or nobody has read it
    /// for the grace period.
    async fn run(&mut self, mut inbox: mpsc::Receiver<String>) {
        let mut check =
            tokio::time::interval(Duration::from_millis(self.shared.config.position_check_ms));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let replica = Arc::clone(&self.replica);
        let unwatched = replica.unwatched_for(self.shared.replica_grace);
        tokio::pin!(unwatched);
        while self.replica.outcome().is_none() {
            tokio::select! {
                biased;
                () = &mut unwatched => return,
                batch = inbox.recv() => match batch {
                    Some(batch) => self.apply(&batch).await,
                    None => return,
                },
                _ = check.tick() => self.check().await,
            }
            if self.behind.swap(false, Ordering::Relaxed) {
                self.check().await;
            }
        }
    }

    /// Applies a published batch: appends what is new; a batch past the
    /// replica's end means batches were missed: read them from the stream.
    async fn apply(&mut self, payload: &str) {
        let Ok(batch) = serde_json::from_str::<Batch>(payload) else {
            return;
        };
        let len = self.replica.len();
        if batch.first > len {
            self.check().await;
            return;
        }
        let Some(events) = decode_events(&batch.events.to_string()) else {
            return;
        };
        self.append(batch.first, events);
        if let Some(status) = batch.status
            && self.replica.len() == batch.top
        {
            self.replica
                .end_replica(decode_outcome(&status.to_string()));
        }
    }

    /// Appends `events` (starting at offset `first`) past the replica's end.
    fn append(&self, first: u64, events: Vec<crate::provider::ProviderEvent>) {
        let len = self.replica.len();
        let skip = usize::try_from(len.saturating_sub(first)).unwrap_or(usize::MAX);
        for event in events.into_iter().skip(skip) {
            if !self.replica.replicate(event) {
                return;
            }
        }
    }

    /// The position check: re-reads the meta hash, reads what the replica
    /// lacks, ends it when the producer has, and fails it closed when the
    /// producer is gone.
    async fn check(&mut self) {
        let Some(meta) = read_meta(&self.shared, self.replica.id()).await else {
            // Redis away: wait for it.
            return;
        };
        if meta.number("top").is_none() {
            // The keys are gone: expired, or Redis restarted empty. A live
            // producer still writing rewrites them soon; a dead one never
            // will, nor one that finished writing before they were lost.
            let now = now_ms();
            let since = *self.missing_since.get_or_insert(now);
            if !self.shared.alive(self.replica.origin().unwrap_or_default()) {
                self.interrupt();
            } else if now.saturating_sub(since) > 3 * self.shared.config.heartbeat_ms + 5_000 {
                self.gap();
            }
            return;
        }
        self.missing_since = None;
        if self.catch_up(&meta).await.is_err() {
            return;
        }
        if self.replica.outcome().is_none()
            && meta.status().is_none()
            && !self.shared.alive(self.replica.origin().unwrap_or_default())
        {
            self.interrupt();
        }
    }

    fn interrupt(&self) {
        tracing::info!(generation = %self.replica.id(), "producing instance gone: reply interrupted");
        self.replica.end_replica(Outcome::Failed(ProviderError::new(
            ErrorClass::Interrupted,
            "the instance producing this reply stopped before it ended; reload the conversation from history",
        )));
    }

    /// Reads the stream from the replica's end up to the meta's top, and
    /// ends the replica if the meta says the reply ended there.
    async fn catch_up(&mut self, meta: &Meta) -> Result<(), Unreachable> {
        let top = meta.number("top").unwrap_or(0);
        if self.replica.len() < top {
            let before = self.replica.len();
            self.read_stream(top).await?;
            if before > 0 && self.replica.len() > before {
                self.shared.recovered.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(status) = meta.status()
            && self.replica.len() >= top
        {
            self.replica.end_replica(decode_outcome(status));
        }
        Ok(())
    }

    /// Reads entries from the replica's end on until it holds `top` events.
    /// An entry that starts past the end is a gap: fail closed.
    async fn read_stream(&mut self, top: u64) -> Result<(), Unreachable> {
        let Some(mut conn) = self.shared.conn() else {
            return Err(Unreachable);
        };
        let key = log_key(self.replica.id());
        // The entry holding the replica's end may start before it.
        let holding: Vec<(String, HashMap<String, String>)> = self
            .shared
            .run(
                redis::cmd("XREVRANGE")
                    .arg(&key)
                    .arg(format!("1-{}", self.replica.len()))
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async::<Value>(&mut conn),
            )
            .await
            .map(parse_entries)
            .ok_or(Unreachable)?;
        let mut lower = holding
            .into_iter()
            .next()
            .map_or_else(|| "-".to_owned(), |(id, _)| id);
        let mut inclusive = true;
        while self.replica.len() < top && self.replica.outcome().is_none() {
            let from = if inclusive {
                lower.clone()
            } else {
                format!("({lower}")
            };
            let page: Vec<(String, HashMap<String, String>)> = self
                .shared
                .run(
                    redis::cmd("XRANGE")
                        .arg(&key)
                        .arg(&from)
                        .arg("+")
                        .arg("COUNT")
                        .arg(PAGE)
                        .query_async::<Value>(&mut conn),
                )
                .await
                .map(parse_entries)
                .ok_or(Unreachable)?;
            if page.is_empty() {
                break;
            }
            let full = page.len() == PAGE;
            for (id, fields) in page {
                let first: u64 = id
                    .split_once('-')
                    .and_then(|(_, seq)| seq.parse().ok())
                    .unwrap_or(u64::MAX);
                let len = self.replica.len();
                if first > len {
                    self.gap();
                    return Ok(());
                }
                let Some(events) = fields.get("e").and_then(|e| decode_events(e)) else {
                    self.gap();
                    return Ok(());
                };
                self.append(first, events);
                lower = id;
            }
            inclusive = false;
            if !full {
                break;
            }
        }
        Ok(())
    }

    fn gap(&self) {
        tracing::warn!(generation = %self.replica.id(), "reply stream has a gap: failing closed");
        self.replica.end_replica(Outcome::Failed(ProviderError::new(
            ErrorClass::Gap,
            "part of this reply is no longer available here; reload the conversation from history",
        )));
    }
}

/// XRANGE's reply as `(id, fields)`.
fn parse_entries(value: Value) -> Vec<(String, HashMap<String, String>)> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut pair) = item else {
                return None;
            };
            if pair.len() != 2 {
                return None;
            }
            let fields = pair.pop()?;
            let id = text(pair.pop()?)?;
            let mut map = HashMap::new();
            match fields {
                Value::Array(flat) => {
                    let mut flat = flat.into_iter();
                    while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
                        map.insert(text(k)?, text(v)?);
                    }
                }
                Value::Map(pairs) => {
                    for (k, v) in pairs {
                        map.insert(text(k)?, text(v)?);
                    }
                }
                _ => return None,
            }
            Some((id, map))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn members_parse_back() {
        let (key, user) = parse_member("a@17|42|user|with|bars").unwrap();
        assert_eq!(key.instance, "a@17");
        assert_eq!(key.connection, 42);
        assert_eq!(user, "user|with|bars");
        assert!(parse_member("a@17|x|u").is_none());
    }

    #[test]
    fn keys_share_a_slot_per_reply_and_per_conversation() {
        let id = uuid::Uuid::nil();
        for key in [log_key(id), meta_key(id), live_channel(id)] {
            assert!(key.contains(&format!("{{g:{id}}}")), "{key}");
        }
        for key in [room_channel("c"), members_key("c"), sent_key("c", "m")] {
            assert!(key.contains("{c:c}"), "{key}");
        }
    }

    #[test]
    fn resp3_is_requested_once() {
        assert_eq!(with_resp3("redis://h:1"), "redis://h:1?protocol=resp3");
        assert_eq!(
            with_resp3("redis://h:1/?x=1"),
            "redis://h:1/?x=1&protocol=resp3"
        );
        assert_eq!(
            with_resp3("redis://h/?protocol=resp3"),
            "redis://h/?protocol=resp3"
        );
    }

    #[test]
    fn entries_parse_from_resp2_and_resp3_shapes() {
        let entry = |fields| Value::Array(vec![Value::BulkString(b"1-5".to_vec()), fields]);
        let flat = Value::Array(vec![entry(Value::Array(vec![
            Value::BulkString(b"e".to_vec()),
            Value::BulkString(b"[]".to_vec()),
        ]))]);
        let map = Value::Array(vec![entry(Value::Map(vec![(
            Value::BulkString(b"e".to_vec()),
            Value::BulkString(b"[]".to_vec()),
        )]))]);
        for value in [flat, map] {
            let parsed = parse_entries(value);
            assert_eq!(parsed.len(), 1);
            assert_eq!(parsed[0].0, "1-5");
            assert_eq!(parsed[0].1.get("e").map(String::as_str), Some("[]"));
        }
    }
}
