//! Conversations, live: who is connected to which conversation (rooms),
//! presence and typing, and `send`: store the user's message, tell the other
//! devices, start the reply and let every member stream it.
//!
//! A **room** is a conversation with at least one connected member. Members
//! are connections (a user's phone and laptop are two members); presence is
//! per user. Non-token events reach a member through its [`Outbox`], a small
//! bounded queue; the reply's tokens never go through it: each member reads
//! the generation's log through its own cursor.
//!
//! Across instances, the [`Bus`] carries room events (published once,
//! delivered to the members on every instance), presence (each room keeps
//! the other instances' members, refreshed every heartbeat) and replies
//! (a reply produced elsewhere is followed as a replica generation that
//! members stream like a local one).

mod outbox;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

pub use outbox::{Outbox, Popped};

use crate::cluster::{Active, Bus, Claim, Inbound, MemberKey, Refreshed, RoomEvent, Session};
use crate::config::{ChatConfig, Config};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::error::ApiError;
use crate::generation::{
    CancelReason, Generation, Outcome, PersistTo, Read, Registry, StartOptions, Subscriber,
};
use crate::protocol::ServerFrame;
use crate::provider::request::Role;
use crate::provider::{ChatRequest, Message, ProviderEvent};
use crate::routing::{AfterCommit, Router};
use crate::store::persister::Persister;
use crate::store::{
    ConversationRow, MessageRow, MessageStatus, Order, Owner, PageRequest, Record, Store,
};

/// A connection's id.
pub type ConnectionId = u64;

/// Why a chat operation failed; each maps to a protocol error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The conversation does not exist or is not the user's.
    #[error("no such conversation")]
    NotFound,
    /// The frame's values are not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The model is not configured.
    #[error("unknown model '{0}'")]
    UnknownModel(String),
    /// The user has too many replies running.
    #[error("too many replies in progress (limit {0})")]
    TooManyGenerations(usize),
    /// The connection subscribes to too many conversations.
    #[error("too many subscriptions on this connection (limit {0})")]
    TooManySubscriptions(usize),
    /// Not subscribed to the conversation.
    #[error("not subscribed to this conversation")]
    NotSubscribed,
    /// The database is unavailable.
    #[error("the database is unavailable")]
    StoreUnavailable,
    /// The message could not be made durable.
    #[error("the message could not be stored")]
    NotStored,
    /// The gateway cannot start a reply now.
    #[error("{0}")]
    Unavailable(String),
    /// A send with this client message id is still being processed.
    #[error("this message is still being sent; resend it in a moment")]
    InProgress,
    /// A rate limit or quota refused it.
    #[error("{0}")]
    Limited(crate::limits::Limited),
}

impl ChatError {
    /// The protocol error code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "conversation_not_found",
            Self::Invalid(_) => "invalid_frame",
            Self::UnknownModel(_) => "model_not_found",
            Self::TooManyGenerations(_) => "too_many_generations",
            Self::TooManySubscriptions(_) => "too_many_subscriptions",
            Self::NotSubscribed => "not_subscribed",
            Self::StoreUnavailable => "store_unavailable",
            Self::NotStored => "not_stored",
            Self::Unavailable(_) => "unavailable",
            Self::InProgress => "send_in_progress",
            Self::Limited(limited) => limited.code(),
        }
    }

    /// Whether the same frame may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Self::TooManyGenerations(_)
                | Self::StoreUnavailable
                | Self::NotStored
                | Self::Unavailable(_)
                | Self::InProgress
                | Self::Limited(_)
        )
    }

    /// As a protocol error frame.
    pub fn frame(&self, client_message_id: Option<String>) -> ServerFrame {
        ServerFrame::Error {
            code: self.code().to_owned(),
            message: self.to_string(),
            retryable: self.retryable(),
            generation_id: None,
            client_message_id,
        }
    }
}

/// One connected member of a room.
#[derive(Debug, Clone)]
struct Member {
    /// The user's tenant.
    tenant_id: String,
    /// Presence is per user.
    user_id: String,
    /// Where the room's events go; `None` for a dropped connection kept
    /// present for the presence grace (a reconnect takes its place).
    outbox: Option<Arc<Outbox>>,
    /// Its identity in presence (other instances know it by this): the
    /// connection id that joined, kept by a reconnect that takes over.
    presence_id: ConnectionId,
}

/// A member of a room on another instance.
#[derive(Debug, Clone)]
struct Remote {
    user_id: String,
    /// Refreshes in a row that did not list it.
    missed: u8,
}

/// A send already answered: a resend with the same client id gets this.
#[derive(Debug, Clone)]
struct Sent {
    message_id: String,
    generation_id: String,
}

/// A conversation with connected members.
#[derive(Debug, Default)]
struct Room {
    /// Members by connection.
    members: HashMap<ConnectionId, Member>,
    /// The conversation so far, oldest first, loaded from the store when
    /// the room opens and kept current by sends and finished replies (the
    /// store lags the persister by a batch).
    history: Option<Vec<(Role, String)>>,
    /// Replies started here whose text joins `history` once they end.
    replies: Vec<Arc<Generation>>,
    /// Receiving this room's events from the bus.
    opened: bool,
    /// Members on other instances.
    remote: HashMap<MemberKey, Remote>,
}

impl Room {
    /// Devices present, on every instance.
    fn devices(&self) -> usize {
        self.members.len() + self.remote.len()
    }

    /// Users present, on every instance, sorted.
    fn users(&self) -> Vec<String> {
        let mut users: Vec<String> = self
            .members
            .values()
            .map(|m| m.user_id.clone())
            .chain(self.remote.values().map(|r| r.user_id.clone()))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        users.sort();
        users
    }
}

/// One user's replies in progress.
#[derive(Debug, Default)]
struct Running {
    /// Replies started and not ended.
    replies: Vec<Arc<Generation>>,
    /// Sends past the limit check that have not started their reply yet:
    /// counted, so concurrent sends cannot all slip under the limit.
    reserved: usize,
}

/// A slot under the per-user limit, held by a send until its reply starts
/// (then it is handed to the reply) or it fails (then it is released).
struct Slot<'a> {
    chat: &'a Chat,
    owner: Owner,
    /// Still held (not yet handed to a started reply).
    held: bool,
}

impl Slot<'_> {
    /// The reply started: it now counts instead of the reservation.
    fn fill(mut self, generation: &Arc<Generation>) {
        let mut running = lock(&self.chat.running);
        let mine = running.entry(self.owner.clone()).or_default();
        mine.reserved = mine.reserved.saturating_sub(1);
        mine.replies.push(Arc::clone(generation));
        self.held = false;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.held {
            let mut running = lock(&self.chat.running);
            if let Some(mine) = running.get_mut(&self.owner) {
                mine.reserved = mine.reserved.saturating_sub(1);
            }
        }
    }
}

/// Marks a send in progress; unmarked when the send ends, whatever way.
struct Pending<'a> {
    chat: &'a Chat,
    key: (String, String),
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        lock(&self.chat.sent).pending.remove(&self.key);
    }
}

/// Recent sends by (conversation, client message id), for idempotency.
/// Kept apart from the rooms: a client that lost an ack resends after it
/// reconnected, when its room may have closed.
#[derive(Debug, Default)]
struct SentMemory {
    sent: HashMap<(String, String), Sent>,
    /// Sends on their way (stored, reply not yet started): a resend of
    /// one of these is told to retry, never answered twice.
    pending: HashSet<(String, String)>,
    /// Insertion order of `sent`, to forget the oldest.
    order: VecDeque<(String, String)>,
}

/// The live side of conversations.
#[derive(Debug)]
pub struct Chat {
    config: ChatConfig,
    /// The model of a `send` that names none.
    default_model: String,
    /// How long a reply runs on with nobody reading.
    grace: Duration,
    /// How long a finished reply stays resumable.
    resume_window: Duration,
    store: Option<Arc<dyn Store>>,
    persister: Option<Persister>,
    generations: Arc<Registry>,
    routes: Arc<Router>,
    /// Rooms by conversation id. A std mutex: held for map and vector
    /// updates only, never across an `.await`.
    rooms: Mutex<HashMap<String, Room>>,
    /// Conversations each connection is subscribed to.
    subscriptions: Mutex<HashMap<ConnectionId, HashSet<String>>>,
    /// Replies each user started (pruned as they end), for the per-user
    /// limit.
    running: Mutex<HashMap<Owner, Running>>,
    /// Recent sends, for idempotent resends.
    sent: Mutex<SentMemory>,
    /// Other instances (or none).
    bus: Arc<dyn Bus>,
    /// How long a dropped connection stays present.
    presence_grace: Duration,
    /// How often presence is refreshed across instances.
    heartbeat: Duration,
    /// How long a resume waits for a followed reply to reach its offset.
    catch_up_wait: Duration,
    /// This service, for the tasks it spawns.
    me: OnceLock<Weak<Chat>>,
    /// Rate limits and token quotas.
    limits: Arc<crate::limits::Limits>,
    /// The session of each live WebSocket connection.
    sessions: Mutex<HashMap<ConnectionId, Session>>,
}

/// How long loading a conversation's context waits for the persister to
/// store what it has journaled.
const HISTORY_FLUSH_WAIT: Duration = Duration::from_secs(2);

/// Sends remembered (over all conversations) for idempotency.
const SENT_MEMORY: usize = 16 * 1024;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Sections are single map/vector updates: a poisoned value is whole.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Chat {
    /// The chat service over the gateway's parts.
    pub fn new(
        config: &Config,
        store: Option<Arc<dyn Store>>,
        persister: Option<Persister>,
        generations: Arc<Registry>,
        routes: Arc<Router>,
        bus: Arc<dyn Bus>,
        limits: Arc<crate::limits::Limits>,
    ) -> Self {
        let default_model = if config.chat.default_model.is_empty() {
            config
                .models
                .first()
                .map(|m| m.name.clone())
                .unwrap_or_default()
        } else {
            config.chat.default_model.clone()
        };
        Self {
            config: config.chat.clone(),
            default_model,
            grace: Duration::from_secs(config.generation.grace_secs),
            resume_window: Duration::from_secs(config.generation.resume_window_secs),
            store,
            persister,
            generations,
            routes,
            rooms: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            sent: Mutex::new(SentMemory::default()),
            bus,
            presence_grace: Duration::from_millis(config.cluster.presence_grace_ms),
            heartbeat: Duration::from_millis(config.cluster.heartbeat_ms),
            catch_up_wait: Duration::from_millis(
                (3 * config.cluster.position_check_ms).max(config.cluster.command_timeout_ms),
            ),
            me: OnceLock::new(),
            limits,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// The session of connection `id`: the one it asked for (`requested`)
    /// when that exists (on any instance, with Redis) and is the same
    /// user's, else a new one. The bool says whether it was restored: its
    /// conversations are to be subscribed again.
    pub async fn open_session(
        &self,
        id: ConnectionId,
        owner: &Owner,
        requested: Option<&str>,
    ) -> (Session, bool) {
        let restored = match requested.filter(|r| uuid::Uuid::parse_str(r).is_ok()) {
            Some(requested) => self.bus.load_session(requested).await.filter(|session| {
                session.tenant_id == owner.tenant_id && session.user_id == owner.user_id
            }),
            None => None,
        };
        let was_restored = restored.is_some();
        let session = restored.unwrap_or_else(|| Session {
            id: uuid::Uuid::new_v4().to_string(),
            tenant_id: owner.tenant_id.clone(),
            user_id: owner.user_id.clone(),
            conversations: Vec::new(),
            created_ms: crate::cluster::now_ms(),
        });
        self.bus.save_session(&session);
        lock(&self.sessions).insert(id, session.clone());
        (session, was_restored)
    }

    /// Records a subscription change in connection `id`'s session.
    pub(crate) fn note_session(&self, id: ConnectionId, conversation_id: &str, subscribed: bool) {
        let mut sessions = lock(&self.sessions);
        let Some(session) = sessions.get_mut(&id) else {
            return;
        };
        let known = session.conversations.iter().any(|c| c == conversation_id);
        if subscribed == known {
            return;
        }
        if subscribed {
            session.conversations.push(conversation_id.to_owned());
        } else {
            session.conversations.retain(|c| c != conversation_id);
        }
        self.bus.save_session(session);
    }

    /// `owner`'s replies running now, here and (with Redis) on every other
    /// instance, oldest first.
    pub async fn active(&self, owner: &Owner) -> Vec<Active> {
        let mut active: Vec<Active> = lock(&self.running)
            .get(owner)
            .map(|mine| {
                mine.replies
                    .iter()
                    .filter(|g| g.outcome().is_none())
                    .filter_map(|g| {
                        Some(Active {
                            generation_id: g.id().to_string(),
                            conversation_id: g.persisted_to()?.conversation_id.clone(),
                            epoch: g.epoch(),
                            instance: self.bus.instance().to_owned(),
                            created: g.created(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        active.extend(self.bus.active(&owner.tenant_id, &owner.user_id).await);
        active.sort_by(|a, b| a.generation_id.cmp(&b.generation_id));
        active.dedup_by(|a, b| a.generation_id == b.generation_id);
        active
    }

    /// Starts the service's background work: with a shared bus, the
    /// dispatch of other instances' events and the presence heartbeat.
    pub fn start(self: &Arc<Self>) {
        if self.me.set(Arc::downgrade(self)).is_err() {
            return;
        }
        if !self.bus.is_shared() {
            return;
        }
        if let Some(mut inbound) = self.bus.inbound() {
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                while let Some(event) = inbound.recv().await {
                    let Some(chat) = me.upgrade() else { return };
                    chat.receive(event);
                }
            });
        }
        let me = Arc::downgrade(self);
        let heartbeat = self.heartbeat;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(chat) = me.upgrade() else { return };
                chat.refresh().await;
            }
        });
    }

    /// The bus this service publishes on.
    pub fn bus(&self) -> &Arc<dyn Bus> {
        &self.bus
    }

    /// The chat settings.
    pub fn config(&self) -> &ChatConfig {
        &self.config
    }

    /// Checks that `conversation_id` is `owner`'s.
    async fn check_owner(&self, owner: &Owner, conversation_id: &str) -> Result<(), ChatError> {
        if uuid::Uuid::parse_str(conversation_id).is_err() {
            return Err(ChatError::NotFound);
        }
        let Some(store) = &self.store else {
            return Err(ChatError::StoreUnavailable);
        };
        match store.get_conversation(owner, conversation_id).await {
            Ok(Some(_)) => Ok(()),
            Ok(None) => Err(ChatError::NotFound),
            Err(err) => {
                tracing::warn!(%err, "store unavailable for an ownership check");
                Err(ChatError::StoreUnavailable)
            }
        }
    }

    /// Subscribes connection `id` to a conversation: it receives the room's
    /// events, a presence snapshot now, and its user's arrival is announced.
    pub async fn subscribe(
        &self,
        id: ConnectionId,
        owner: &Owner,
        outbox: &Arc<Outbox>,
        conversation_id: &str,
    ) -> Result<(), ChatError> {
        self.check_owner(owner, conversation_id).await?;
        let opened = lock(&self.rooms)
            .get(conversation_id)
            .is_some_and(|room| room.opened);
        // Receive the room's events from other instances before reading
        // who is there, so no join falls in between.
        let remote = if self.bus.is_shared() && !opened {
            Some(self.bus.open_room(conversation_id).await)
        } else {
            None
        };
        {
            let mut subscriptions = lock(&self.subscriptions);
            let mine = subscriptions.entry(id).or_default();
            if !mine.contains(conversation_id) && mine.len() >= self.config.max_subscriptions {
                return Err(ChatError::TooManySubscriptions(
                    self.config.max_subscriptions,
                ));
            }
            mine.insert(conversation_id.to_owned());
        }
        let mut rooms = lock(&self.rooms);
        let room = rooms.entry(conversation_id.to_owned()).or_default();
        if let Some(remote) = remote
            && !room.opened
        {
            room.opened = true;
            room.remote = remote
                .into_iter()
                .map(|(key, user_id)| (key, Remote { user_id, missed: 0 }))
                .collect();
        }
        let rejoined = room.members.contains_key(&id);
        // A dropped connection of this user still present within its grace
        // is taken over: no leave, no join, the same presence identity.
        let ghost = if rejoined {
            None
        } else {
            room.members
                .iter()
                .find(|(_, m)| {
                    m.outbox.is_none()
                        && m.user_id == owner.user_id
                        && m.tenant_id == owner.tenant_id
                })
                .map(|(ghost, _)| *ghost)
        };
        let presence_id = match ghost.and_then(|ghost| room.members.remove(&ghost)) {
            Some(ghost) => ghost.presence_id,
            None => room.members.get(&id).map_or(id, |m| m.presence_id),
        };
        room.members.insert(
            id,
            Member {
                tenant_id: owner.tenant_id.clone(),
                user_id: owner.user_id.clone(),
                outbox: Some(Arc::clone(outbox)),
                presence_id,
            },
        );
        let devices = room.devices();
        outbox.push(ServerFrame::Presence {
            conversation_id: conversation_id.to_owned(),
            event: "snapshot".into(),
            users: room.users(),
            devices,
        });
        // Replies already running here stream to the newcomer too.
        for generation in room.replies.iter().filter(|g| g.outcome().is_none()) {
            outbox.push(ServerFrame::Reply {
                conversation_id: conversation_id.to_owned(),
                generation_id: generation.id().to_string(),
                epoch: generation.epoch(),
            });
        }
        // Every device's arrival is news to the others (a user's laptop
        // learns that their phone opened the conversation).
        if !rejoined && ghost.is_none() {
            publish(
                room,
                Some(id),
                &ServerFrame::Presence {
                    conversation_id: conversation_id.to_owned(),
                    event: "join".into(),
                    users: vec![owner.user_id.clone()],
                    devices,
                },
            );
            self.bus.publish(
                conversation_id,
                RoomEvent::Join {
                    connection: presence_id,
                    user_id: owner.user_id.clone(),
                },
            );
        }
        drop(rooms);
        self.note_session(id, conversation_id, true);
        Ok(())
    }

    /// Unsubscribes connection `id` from a conversation.
    pub fn unsubscribe(&self, id: ConnectionId, conversation_id: &str) {
        if let Some(mine) = lock(&self.subscriptions).get_mut(&id) {
            mine.remove(conversation_id);
        }
        self.note_session(id, conversation_id, false);
        self.leave(id, conversation_id);
    }

    /// Removes connection `id` from every room. Its presence stays for the
    /// presence grace, so a reconnect within it makes no leave/join
    /// flicker.
    pub fn disconnect(&self, id: ConnectionId) {
        // The session record stays (with its TTL) for a reconnect.
        lock(&self.sessions).remove(&id);
        let conversations = lock(&self.subscriptions).remove(&id).unwrap_or_default();
        if self.presence_grace.is_zero() {
            for conversation_id in conversations {
                self.leave(id, &conversation_id);
            }
            return;
        }
        {
            let mut rooms = lock(&self.rooms);
            for conversation_id in &conversations {
                if let Some(member) = rooms
                    .get_mut(conversation_id)
                    .and_then(|room| room.members.get_mut(&id))
                {
                    member.outbox = None;
                }
            }
        }
        let Some(me) = self.me.get().cloned() else {
            for conversation_id in conversations {
                self.leave(id, &conversation_id);
            }
            return;
        };
        let grace = self.presence_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let Some(chat) = me.upgrade() else { return };
            for conversation_id in conversations {
                // Unless a reconnect took its place.
                let ghost = lock(&chat.rooms)
                    .get(&conversation_id)
                    .and_then(|room| room.members.get(&id))
                    .is_some_and(|m| m.outbox.is_none());
                if ghost {
                    chat.leave(id, &conversation_id);
                }
            }
        });
    }

    fn leave(&self, id: ConnectionId, conversation_id: &str) {
        let mut rooms = lock(&self.rooms);
        let Some(room) = rooms.get_mut(conversation_id) else {
            return;
        };
        let Some(member) = room.members.remove(&id) else {
            return;
        };
        let devices = room.devices();
        publish(
            room,
            None,
            &ServerFrame::Presence {
                conversation_id: conversation_id.to_owned(),
                event: "leave".into(),
                users: vec![member.user_id.clone()],
                devices,
            },
        );
        self.bus.publish(
            conversation_id,
            RoomEvent::Leave {
                connection: member.presence_id,
                user_id: member.user_id,
            },
        );
        self.prune(&mut rooms);
    }

    /// Forgets rooms nobody is in and nothing is running in (their history
    /// reloads from the store when someone comes back), and stops
    /// receiving their events. Called as members leave and as sends
    /// start, so the map stays bounded by what is live.
    fn prune(&self, rooms: &mut HashMap<String, Room>) {
        rooms.retain(|conversation_id, room| {
            let keep =
                !room.members.is_empty() || room.replies.iter().any(|g| g.outcome().is_none());
            if !keep && room.opened {
                self.bus.close_room(conversation_id);
            }
            keep
        });
    }

    /// Rooms held now (for tests and metrics).
    pub fn rooms(&self) -> usize {
        let mut rooms = lock(&self.rooms);
        self.prune(&mut rooms);
        rooms.len()
    }

    /// Handles an event from another instance.
    fn receive(&self, inbound: Inbound) {
        let (instance, conversation_id, event) = match inbound {
            Inbound::Cancel { generation_id } => {
                if let Some(generation) = self.generations.get(generation_id) {
                    generation.cancel(CancelReason::Requested);
                }
                return;
            }
            Inbound::Room {
                instance,
                conversation_id,
                event,
            } => (instance, conversation_id, event),
        };
        if event == RoomEvent::Forget {
            self.forget_conversation_here(&conversation_id);
            return;
        }
        let mut rooms = lock(&self.rooms);
        let Some(room) = rooms.get_mut(&conversation_id) else {
            return;
        };
        let frame = match event {
            RoomEvent::Message { message } => {
                // The conversation moved on elsewhere: reload the context
                // from the store at the next send here.
                room.history = None;
                ServerFrame::Message {
                    conversation_id,
                    message,
                }
            }
            RoomEvent::Typing { user_id, typing } => ServerFrame::Typing {
                conversation_id,
                user_id,
                typing,
            },
            RoomEvent::Reply {
                generation_id,
                epoch,
            } => ServerFrame::Reply {
                conversation_id,
                generation_id,
                epoch,
            },
            RoomEvent::Join {
                connection,
                user_id,
            } => {
                let key = MemberKey {
                    instance,
                    connection,
                };
                let known = room
                    .remote
                    .insert(
                        key,
                        Remote {
                            user_id: user_id.clone(),
                            missed: 0,
                        },
                    )
                    .is_some();
                if known {
                    return;
                }
                ServerFrame::Presence {
                    conversation_id,
                    event: "join".into(),
                    users: vec![user_id],
                    devices: room.devices(),
                }
            }
            RoomEvent::Leave {
                connection,
                user_id,
            } => {
                let key = MemberKey {
                    instance,
                    connection,
                };
                if room.remote.remove(&key).is_none() {
                    return;
                }
                ServerFrame::Presence {
                    conversation_id,
                    event: "leave".into(),
                    users: vec![user_id],
                    devices: room.devices(),
                }
            }
            RoomEvent::Forget => return,
        };
        publish(room, None, &frame);
    }

    /// The presence heartbeat: writes this instance's members, reads the
    /// other instances', and announces the differences (members of a dead
    /// instance leave; joins and leaves missed on the bus are caught up).
    async fn refresh(&self) {
        let local: Vec<(String, Vec<(u64, String)>)> = lock(&self.rooms)
            .iter()
            .filter(|(_, room)| room.opened)
            .map(|(id, room)| {
                let members = room
                    .members
                    .values()
                    .map(|m| (m.presence_id, m.user_id.clone()))
                    .collect();
                (id.clone(), members)
            })
            .collect();
        let Some(Refreshed {
            dead, rooms: seen, ..
        }) = self.bus.refresh(&local).await
        else {
            return;
        };
        let mut rooms = lock(&self.rooms);
        for (conversation_id, now) in seen {
            let Some(room) = rooms.get_mut(&conversation_id) else {
                continue;
            };
            let mut changes: Vec<(&'static str, String)> = Vec::new();
            for (key, user_id) in &now {
                if let Some(remote) = room.remote.get_mut(key) {
                    remote.missed = 0;
                } else {
                    room.remote.insert(
                        key.clone(),
                        Remote {
                            user_id: user_id.clone(),
                            missed: 0,
                        },
                    );
                    changes.push(("join", user_id.clone()));
                }
            }
            // A member not listed twice in a row (its join may not have
            // been written yet the first time), or of a dead instance, left.
            let mut gone = Vec::new();
            for (key, remote) in &mut room.remote {
                if now.contains_key(key) {
                    continue;
                }
                remote.missed = remote.missed.saturating_add(1);
                if remote.missed >= 2 || dead.contains(&key.instance) {
                    gone.push(key.clone());
                }
            }
            for key in gone {
                if let Some(remote) = room.remote.remove(&key) {
                    changes.push(("leave", remote.user_id));
                }
            }
            for (event, user_id) in changes {
                let frame = ServerFrame::Presence {
                    conversation_id: conversation_id.clone(),
                    event: event.into(),
                    users: vec![user_id],
                    devices: room.devices(),
                };
                publish(room, None, &frame);
            }
        }
    }

    /// Whether connection `id` is subscribed to the conversation.
    pub fn is_subscribed(&self, id: ConnectionId, conversation_id: &str) -> bool {
        lock(&self.subscriptions)
            .get(&id)
            .is_some_and(|c| c.contains(conversation_id))
    }

    /// Relays a typing indicator to the room's other members.
    pub fn typing(
        &self,
        id: ConnectionId,
        owner: &Owner,
        conversation_id: &str,
        typing: bool,
    ) -> Result<(), ChatError> {
        if !self.is_subscribed(id, conversation_id) {
            return Err(ChatError::NotSubscribed);
        }
        if let Some(room) = lock(&self.rooms).get_mut(conversation_id) {
            publish(
                room,
                Some(id),
                &ServerFrame::Typing {
                    conversation_id: conversation_id.to_owned(),
                    user_id: owner.user_id.clone(),
                    typing,
                },
            );
        }
        self.bus.publish(
            conversation_id,
            RoomEvent::Typing {
                user_id: owner.user_id.clone(),
                typing,
            },
        );
        Ok(())
    }

    /// A user message: stored durably (the returned ack may be sent once
    /// this returns), shown to the room's other members, and answered by a
    /// reply every member streams (announced with a `reply` frame). The
    /// sending connection is subscribed to the conversation. A resend of a
    /// known `client_message_id` returns the first ack and starts nothing.
    pub async fn send(
        &self,
        connection: Option<(ConnectionId, &Arc<Outbox>)>,
        principal: &crate::auth::Principal,
        conversation_id: &str,
        content: String,
        client_message_id: String,
        model: Option<String>,
    ) -> Result<ServerFrame, ChatError> {
        let owner = &principal.owner();
        if content.trim().is_empty() {
            return Err(ChatError::Invalid("'content' must not be empty".into()));
        }
        // PostgreSQL cannot store NUL in text; nobody types one.
        if content.contains('\0') || client_message_id.contains('\0') {
            return Err(ChatError::Invalid(
                "'content' must not contain NUL characters".into(),
            ));
        }
        if content.len() > self.config.max_message_bytes {
            return Err(ChatError::Invalid(format!(
                "'content' exceeds {} bytes",
                self.config.max_message_bytes
            )));
        }
        if client_message_id.is_empty() || client_message_id.len() > 128 {
            return Err(ChatError::Invalid(
                "'client_message_id' must be 1 to 128 characters".into(),
            ));
        }
        let model = model.unwrap_or_else(|| self.default_model.clone());
        let route = self
            .routes
            .route(&model)
            .ok_or_else(|| ChatError::UnknownModel(model.clone()))?;
        match connection {
            Some((id, outbox)) if !self.is_subscribed(id, conversation_id) => {
                self.subscribe(id, owner, outbox, conversation_id).await?;
            }
            Some(_) => {}
            None => self.check_owner(owner, conversation_id).await?,
        }
        let epoch = crate::generation::epoch();
        let key = (conversation_id.to_owned(), client_message_id.clone());
        {
            let mut memory = lock(&self.sent);
            if let Some(sent) = memory.sent.get(&key).cloned() {
                return Ok(ServerFrame::Ack {
                    client_message_id,
                    message_id: sent.message_id,
                    conversation_id: conversation_id.to_owned(),
                    generation_id: sent.generation_id,
                    epoch,
                });
            }
            // Check and mark in one step: two sends of one id racing (a
            // resend after a reconnect while the first is still being
            // stored) cannot both start a reply.
            if !memory.pending.insert(key.clone()) {
                return Err(ChatError::InProgress);
            }
        }
        let _pending = Pending {
            chat: self,
            key: key.clone(),
        };
        // The same across instances: a resend that lands on another one
        // (after a reconnect) is answered from what the first one recorded.
        let claim_id = client_message_id.clone();
        let mut claim = Claimed {
            bus: self.bus.as_ref(),
            conversation_id,
            client_message_id: &claim_id,
            held: false,
        };
        match self
            .bus
            .claim_send(conversation_id, &client_message_id)
            .await
        {
            Claim::Fresh => claim.held = self.bus.is_shared(),
            Claim::InProgress => return Err(ChatError::InProgress),
            Claim::Sent {
                message_id,
                generation_id,
            } => {
                return Ok(ServerFrame::Ack {
                    client_message_id: client_message_id.clone(),
                    message_id,
                    conversation_id: conversation_id.to_owned(),
                    generation_id,
                    epoch,
                });
            }
        }
        // A new message (a resend was answered above): it counts against
        // the rate limit, and its reply's tokens against the daily quota.
        self.limits
            .check(
                crate::limits::Kind::Message,
                &principal.limit_key(),
                &principal.tier,
            )
            .await
            .map_err(ChatError::Limited)?;
        let slot = self.reserve(owner)?;
        let history = self.history(owner, conversation_id).await?;
        let prompt_chars: usize =
            history.iter().map(|(_, text)| text.len()).sum::<usize>() + content.len();
        let mut quota = Unused(Some(
            self.limits
                .reserve_tokens(
                    &principal.tenant,
                    &principal.user,
                    &principal.tier,
                    quota_estimate(prompt_chars, None),
                )
                .await
                .map_err(ChatError::Limited)?,
        ));

        let now = crate::store::now_ms();
        let message = MessageRow {
            id: uuid::Uuid::now_v7().to_string(),
            conversation_id: conversation_id.to_owned(),
            tenant_id: owner.tenant_id.clone(),
            user_id: owner.user_id.clone(),
            role: "user".into(),
            content: content.clone(),
            status: MessageStatus::Complete,
            model: None,
            provider: None,
            prompt_tokens: None,
            completion_tokens: None,
            cost_usd: None,
            usage_estimated: false,
            client_message_id: Some(client_message_id.clone()),
            generation_id: None,
            created_at: now,
        };
        let Some(persister) = &self.persister else {
            return Err(ChatError::StoreUnavailable);
        };
        if let Err(err) = persister.submit(&Record::Message(message.clone())).await {
            tracing::error!(%err, "user message not stored");
            return Err(ChatError::NotStored);
        }

        let mut messages: Vec<Message> = history
            .iter()
            .map(|(role, text)| Message::text(*role, text.clone()))
            .collect();
        messages.push(Message::text(Role::User, content.clone()));
        let request = ChatRequest {
            model: model.clone(),
            messages,
            max_tokens: None,
            max_completion_tokens: None,
            temperature: None,
            top_p: None,
            stop: None,
            tools: None,
            tool_choice: None,
            user: Some(owner.user_id.clone()),
            trace: crate::telemetry::current(),
            extra: serde_json::Map::new(),
        };
        let options = StartOptions {
            grace: self.grace,
            retain: self.resume_window,
            after_commit: AfterCommit::Restart,
            persist: Some(PersistTo {
                owner: owner.clone(),
                conversation_id: conversation_id.to_owned(),
            }),
        };
        let subscriber = self
            .generations
            .start(&self.routes, route, request, options)
            .map_err(|err| ChatError::Unavailable(err.to_string()))?;
        let generation = Arc::clone(subscriber.generation());
        // Other instances resume it from the mirror.
        self.bus.mirror(&generation);
        if let Some(reservation) = quota.0.take() {
            meter(
                reservation,
                Arc::clone(&generation),
                Arc::clone(&self.limits),
                principal.tenant.clone(),
            );
        }
        // Members attach their own cursors when they see `reply`.
        drop(subscriber);
        let generation_id = generation.id().to_string();
        slot.fill(&generation);
        claim.held = false;
        self.bus.record_send(
            conversation_id,
            &client_message_id,
            &message.id,
            &generation_id,
        );

        {
            let mut memory = lock(&self.sent);
            let sent = Sent {
                message_id: message.id.clone(),
                generation_id: generation_id.clone(),
            };
            if memory.sent.insert(key.clone(), sent).is_none() {
                memory.order.push_back(key);
            }
            while memory.order.len() > SENT_MEMORY {
                if let Some(old) = memory.order.pop_front() {
                    memory.sent.remove(&old);
                }
            }
        }
        let message_json = crate::http::conversations::message_json(&message);
        let mut rooms = lock(&self.rooms);
        self.prune(&mut rooms);
        let room = rooms.entry(conversation_id.to_owned()).or_default();
        if let Some(history) = &mut room.history {
            history.push((Role::User, content));
        }
        room.replies.push(Arc::clone(&generation));
        publish(
            room,
            connection.map(|(id, _)| id),
            &ServerFrame::Message {
                conversation_id: conversation_id.to_owned(),
                message: message_json.clone(),
            },
        );
        publish(
            room,
            None,
            &ServerFrame::Reply {
                conversation_id: conversation_id.to_owned(),
                generation_id: generation_id.clone(),
                epoch,
            },
        );
        drop(rooms);
        self.bus.publish(
            conversation_id,
            RoomEvent::Message {
                message: message_json,
            },
        );
        self.bus.publish(
            conversation_id,
            RoomEvent::Reply {
                generation_id: generation_id.clone(),
                epoch,
            },
        );
        Ok(ServerFrame::Ack {
            client_message_id,
            message_id: message.id,
            conversation_id: conversation_id.to_owned(),
            generation_id,
            epoch,
        })
    }

    /// Creates a conversation for `owner` (for clients that start one
    /// without the history API).
    pub async fn create_conversation(&self, owner: &Owner) -> Result<String, ChatError> {
        let Some(store) = &self.store else {
            return Err(ChatError::StoreUnavailable);
        };
        let now = crate::store::now_ms();
        let row = ConversationRow {
            id: uuid::Uuid::now_v7().to_string(),
            tenant_id: owner.tenant_id.clone(),
            user_id: owner.user_id.clone(),
            title: None,
            metadata: serde_json::json!({}),
            created_at: now,
            updated_at: now,
        };
        store
            .create_conversation(&row)
            .await
            .map_err(|_| ChatError::StoreUnavailable)?;
        Ok(row.id)
    }

    /// Takes a slot under the per-user limit of running replies.
    fn reserve(&self, owner: &Owner) -> Result<Slot<'_>, ChatError> {
        let mut running = lock(&self.running);
        // Forget ended replies and idle users, so the map stays bounded by
        // what is running.
        running.retain(|_, mine| {
            mine.replies.retain(|g| g.outcome().is_none());
            !mine.replies.is_empty() || mine.reserved > 0
        });
        let mine = running.entry(owner.clone()).or_default();
        if mine.replies.len() + mine.reserved >= self.config.max_generations_per_user {
            return Err(ChatError::TooManyGenerations(
                self.config.max_generations_per_user,
            ));
        }
        mine.reserved += 1;
        Ok(Slot {
            chat: self,
            owner: owner.clone(),
            held: true,
        })
    }

    /// Forgets everything live about a deleted conversation, on every
    /// instance: its room (and the history cached there), its running
    /// replies (cancelled) and the sends remembered for it. Members are
    /// told and unsubscribed.
    pub fn forget_conversation(&self, conversation_id: &str) {
        self.forget_conversation_here(conversation_id);
        self.bus.publish(conversation_id, RoomEvent::Forget);
    }

    fn forget_conversation_here(&self, conversation_id: &str) {
        let room = lock(&self.rooms).remove(conversation_id);
        if let Some(room) = room {
            if room.opened {
                self.bus.close_room(conversation_id);
            }
            for generation in &room.replies {
                generation.cancel(CancelReason::Requested);
            }
            let gone = ChatError::NotFound.frame(None);
            for (id, member) in &room.members {
                if let Some(outbox) = &member.outbox {
                    outbox.push(gone.clone());
                }
                if let Some(mine) = lock(&self.subscriptions).get_mut(id) {
                    mine.remove(conversation_id);
                }
            }
        }
        let mut memory = lock(&self.sent);
        memory
            .sent
            .retain(|(conversation, _), _| conversation != conversation_id);
        memory
            .order
            .retain(|(conversation, _)| conversation != conversation_id);
    }

    /// Forgets everything live about an erased user: every room of theirs
    /// (history included) and their running replies.
    pub fn forget_user(&self, owner: &Owner) {
        let conversations: Vec<String> = lock(&self.rooms)
            .iter()
            .filter(|(_, room)| {
                room.members
                    .values()
                    .any(|m| m.user_id == owner.user_id && m.tenant_id == owner.tenant_id)
                    || room
                        .replies
                        .iter()
                        .any(|g| g.persisted_to().is_some_and(|to| to.owner == *owner))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for conversation_id in conversations {
            self.forget_conversation(&conversation_id);
        }
        if let Some(mine) = lock(&self.running).remove(owner) {
            for generation in mine.replies {
                generation.cancel(CancelReason::Requested);
            }
        }
    }

    /// The conversation so far, for the model: loaded from the store the
    /// first time, then kept in the room, with finished replies folded in.
    async fn history(
        &self,
        owner: &Owner,
        conversation_id: &str,
    ) -> Result<Vec<(Role, String)>, ChatError> {
        let loaded = lock(&self.rooms)
            .get(conversation_id)
            .is_some_and(|room| room.history.is_some());
        if !loaded {
            let Some(store) = &self.store else {
                return Err(ChatError::StoreUnavailable);
            };
            // The store lags the persister by a batch: the exchange that
            // just ended (its room closed when the client left) may not be
            // in it yet. Wait for what this conversation has journaled,
            // within a bound (not for other conversations' batches).
            if let Some(persister) = &self.persister {
                let flushed = tokio::time::timeout(
                    HISTORY_FLUSH_WAIT,
                    persister.flushed_for(conversation_id),
                )
                .await;
                if flushed.is_err() {
                    tracing::warn!(
                        conversation = conversation_id,
                        "the store lags the persister: context may miss recent messages"
                    );
                }
            }
            let page = PageRequest {
                after: None,
                limit: u32::try_from(self.config.max_context_messages)
                    .unwrap_or(200)
                    .min(200),
                order: Order::Desc,
            };
            let page = store
                .list_messages(owner, conversation_id, &page)
                .await
                .map_err(|_| ChatError::StoreUnavailable)?
                .ok_or(ChatError::NotFound)?;
            let mut history: Vec<(Role, String)> = page
                .items
                .into_iter()
                .rev()
                .filter_map(|m| {
                    let role = match m.role.as_str() {
                        "user" => Role::User,
                        "assistant" => Role::Assistant,
                        "system" => Role::System,
                        _ => return None,
                    };
                    (!m.content.is_empty()).then_some((role, m.content))
                })
                .collect();
            let mut rooms = lock(&self.rooms);
            let room = rooms.entry(conversation_id.to_owned()).or_default();
            if room.history.is_none() {
                history.truncate(self.config.max_context_messages);
                room.history = Some(history);
            }
        }
        let mut rooms = lock(&self.rooms);
        let room = rooms.entry(conversation_id.to_owned()).or_default();
        // Fold finished replies into the history, in order.
        let (finished, running): (Vec<_>, Vec<_>) =
            room.replies.drain(..).partition(|g| g.outcome().is_some());
        room.replies = running;
        let history = room.history.get_or_insert_with(Vec::new);
        for generation in finished {
            let text = generation.reply().text;
            if !text.is_empty() {
                history.push((Role::Assistant, text));
            }
        }
        let excess = history
            .len()
            .saturating_sub(self.config.max_context_messages);
        history.drain(..excess);
        Ok(history.clone())
    }

    /// The generation `id` if it answers one of `owner`'s conversations.
    pub fn generation_of(&self, owner: &Owner, id: &str) -> Option<Arc<Generation>> {
        let id = uuid::Uuid::parse_str(id).ok()?;
        let generation = self.generations.get(id)?;
        let to = generation.persisted_to()?;
        (to.owner == *owner).then_some(generation)
    }
}

impl Chat {
    /// The generation `id` if it answers one of `owner`'s conversations:
    /// held here, or produced on another instance and followed here.
    pub async fn find_generation(&self, owner: &Owner, id: &str) -> Option<Arc<Generation>> {
        match self.lookup_generation(owner, id).await {
            Lookup::Found(generation) => Some(generation),
            Lookup::Missing | Lookup::Unavailable => None,
        }
    }

    /// Like [`Chat::find_generation`], telling "no such reply" from "the
    /// instances holding replies cannot be asked now".
    pub async fn lookup_generation(&self, owner: &Owner, id: &str) -> Lookup {
        if let Some(generation) = self.generation_of(owner, id) {
            return Lookup::Found(generation);
        }
        let Ok(uuid) = uuid::Uuid::parse_str(id) else {
            return Lookup::Missing;
        };
        let generation = match self.bus.follow(uuid).await {
            Ok(Some(generation)) => generation,
            Ok(None) => return Lookup::Missing,
            Err(err) => {
                tracing::warn!(generation = id, %err, "cannot follow a reply from another instance");
                return Lookup::Unavailable;
            }
        };
        match generation.persisted_to() {
            Some(to) if to.owner == *owner => Lookup::Found(generation),
            _ => Lookup::Missing,
        }
    }

    /// The generation `owner` may resume at (`epoch`, `offset`); the error
    /// says why the client must reload from history instead. A reply
    /// followed from another instance may lag what the client saw there:
    /// the resume waits (a little) for it to catch up, never replaying
    /// from an earlier offset.
    pub async fn resume_target(
        &self,
        owner: &Owner,
        id: &str,
        epoch: u64,
        offset: u64,
    ) -> Result<Arc<Generation>, ResumeError> {
        let generation = match self.lookup_generation(owner, id).await {
            Lookup::Found(generation) => generation,
            Lookup::Missing => {
                return Err(ResumeError::Reload(
                    "the reply is no longer held: reload the conversation from history",
                ));
            }
            Lookup::Unavailable => return Err(ResumeError::Unavailable),
        };
        if epoch != generation.epoch() {
            return Err(ResumeError::Reload(
                "unknown epoch: reload the conversation from history",
            ));
        }
        if offset > generation.len() {
            let reached = generation.origin().is_some()
                && tokio::time::timeout(self.catch_up_wait, generation.reached(offset))
                    .await
                    .unwrap_or(false);
            if !reached {
                return Err(ResumeError::Reload(
                    "offset beyond the reply: reload the conversation from history",
                ));
            }
        }
        Ok(generation)
    }

    /// Cancels `owner`'s generation `id` wherever it runs; false when there
    /// is no such generation.
    pub async fn cancel(&self, owner: &Owner, id: &str) -> bool {
        let Some(generation) = self.find_generation(owner, id).await else {
            return false;
        };
        if generation.origin().is_some() {
            // The producer cancels it; the replica ends when its end
            // arrives through the stream.
            self.bus.cancel_remote(&generation);
        } else {
            generation.cancel(CancelReason::Requested);
        }
        true
    }
}

/// A generation looked up by id.
#[derive(Debug)]
pub enum Lookup {
    /// Held here, or followed from another instance.
    Found(Arc<Generation>),
    /// No instance holds it for this user.
    Missing,
    /// Another instance may hold it, but the bus cannot be asked now.
    Unavailable,
}

/// Why a resume cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeError {
    /// It never can: the client must reload the conversation from history.
    Reload(&'static str),
    /// Not now (Redis is unreachable): retry the resume shortly.
    Unavailable,
}

impl ResumeError {
    /// The protocol error frame for generation `generation_id`.
    pub fn frame(&self, generation_id: &str) -> ServerFrame {
        let (code, message, retryable) = match self {
            Self::Reload(message) => ("reload_from_history", *message, false),
            Self::Unavailable => (
                "unavailable",
                "replies of other instances cannot be reached now: resume again shortly",
                true,
            ),
        };
        ServerFrame::Error {
            code: code.to_owned(),
            message: message.to_owned(),
            retryable,
            generation_id: Some(generation_id.to_owned()),
            client_message_id: None,
        }
    }
}

/// A quota reservation not (yet) handed to a reply: released at zero when
/// the send fails before the reply starts.
struct Unused(Option<crate::limits::Reservation>);

impl Drop for Unused {
    fn drop(&mut self) {
        if let Some(reservation) = self.0.take() {
            reservation.settle(0);
        }
    }
}

/// Tokens a reply may use, reserved against the daily quota before it
/// starts: the prompt (estimated from its characters) plus the completion
/// limit asked for (or a default).
pub fn quota_estimate(prompt_chars: usize, max_completion: Option<u64>) -> u64 {
    /// Completion tokens reserved when the request names no limit.
    const DEFAULT_COMPLETION: u64 = 1_024;
    crate::usage::estimate_tokens(prompt_chars) + max_completion.unwrap_or(DEFAULT_COMPLETION)
}

/// Settles `reservation` with `generation`'s real usage once it ends, and
/// counts its cost against the tenant's budget.
pub fn meter(
    reservation: crate::limits::Reservation,
    generation: Arc<Generation>,
    limits: Arc<crate::limits::Limits>,
    tenant: String,
) {
    let span = tracing::Span::current();
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            generation.ended().await;
            match generation.usage() {
                Some(record) => {
                    reservation.settle(record.usage.total_tokens());
                    record_usage_metrics(&tenant, record);
                    if let Some(cost) = record.cost_usd {
                        limits.record_cost(&tenant, cost);
                    }
                }
                // No record: keep the estimate counted.
                None => drop(reservation),
            }
        },
        span,
    ));
}

/// Counts one reply's tokens (per attempt that billed) and cost in the
/// metrics.
fn record_usage_metrics(tenant: &str, record: &crate::usage::UsageRecord) {
    let metrics = crate::metrics::get();
    for attempt in &record.attempts {
        if let Some(billed) = attempt.billed {
            metrics.usage(
                tenant,
                &attempt.provider,
                &attempt.model,
                billed.prompt_tokens,
                billed.completion_tokens,
                0.0,
            );
        }
    }
    if let (Some(cost), Some(provider), Some(model)) =
        (record.cost_usd, &record.provider, &record.upstream_model)
    {
        metrics.usage(tenant, provider, model, 0, 0, cost);
    }
}

/// A send claimed across instances; released unless the send got as far as
/// starting its reply.
struct Claimed<'a> {
    bus: &'a dyn Bus,
    conversation_id: &'a str,
    client_message_id: &'a str,
    held: bool,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        if self.held {
            self.bus
                .release_send(self.conversation_id, self.client_message_id);
        }
    }
}

/// A subscriber's reads as a stream, ending after the read that ends the
/// log, each paired with its generation.
pub fn reads(subscriber: Subscriber) -> BoxStream<'static, (Arc<Generation>, Read)> {
    futures_util::stream::unfold(Some(subscriber), |state| async move {
        let mut subscriber = state?;
        let read = subscriber.read().await;
        let generation = Arc::clone(subscriber.generation());
        let next = matches!(read, Read::Frames(_)).then_some(subscriber);
        Some(((generation, read), next))
    })
    .boxed()
}

/// The protocol frames of one read of `generation`'s log. `finish` carries
/// the finish reason from the `Finish` event to the `done` frame that ends
/// the stream.
pub fn encode(generation: &Generation, read: Read, finish: &mut String) -> Vec<ServerFrame> {
    let generation_id = generation.id().to_string();
    let epoch = generation.epoch();
    match read {
        Read::Frames(frames) => {
            let mut out: Vec<ServerFrame> = Vec::with_capacity(frames.len());
            // A finish has no frame of its own (`done` tells its reason),
            // but its offset must still be covered so that every frame
            // starts where the previous one ended: by the frame before it
            // in this read, else by the one after it, else by an empty
            // delta.
            let mut uncovered: Option<(u64, u64)> = None;
            for frame in frames {
                let (mut offset, next) = (frame.offset, frame.next);
                if let ProviderEvent::Finish(reason) = &frame.event {
                    reason.as_str().clone_into(finish);
                    match out.last_mut() {
                        Some(previous) => extend_to(previous, next),
                        None => uncovered = Some((offset, next)),
                    }
                    continue;
                }
                if let Some((start, _)) = uncovered.take() {
                    offset = start;
                }
                let generation_id = generation_id.clone();
                out.push(match frame.event {
                    ProviderEvent::Text(text) | ProviderEvent::Refusal(text) => {
                        ServerFrame::Delta {
                            generation_id,
                            epoch,
                            offset,
                            next,
                            text,
                        }
                    }
                    ProviderEvent::Reasoning(text) => ServerFrame::Reasoning {
                        generation_id,
                        epoch,
                        offset,
                        next,
                        text,
                    },
                    ProviderEvent::ToolCall(call) => ServerFrame::ToolCall {
                        generation_id,
                        epoch,
                        offset,
                        next,
                        index: call.index,
                        id: call.id,
                        name: call.name,
                        arguments: call.arguments,
                    },
                    ProviderEvent::Usage(usage) => ServerFrame::Usage {
                        generation_id,
                        epoch,
                        offset,
                        next,
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                    },
                    ProviderEvent::Restart => ServerFrame::Restart {
                        generation_id,
                        epoch,
                        offset,
                        next,
                    },
                    ProviderEvent::Finish(_) => continue,
                });
            }
            if let Some((offset, next)) = uncovered {
                out.push(ServerFrame::Delta {
                    generation_id,
                    epoch,
                    offset,
                    next,
                    text: String::new(),
                });
            }
            out
        }
        Read::End(Outcome::Complete) => {
            let end = generation.len();
            // A reader that resumed past the finish event did not see it:
            // the log still knows the reason.
            let finish_reason = if finish.is_empty() {
                generation
                    .reply()
                    .finish
                    .map_or_else(|| "stop".to_owned(), |r| r.as_str().to_owned())
            } else {
                finish.clone()
            };
            vec![ServerFrame::Done {
                generation_id,
                epoch,
                offset: end,
                next: end,
                finish_reason,
            }]
        }
        Read::End(outcome) => {
            let api = ApiError::from(&outcome);
            let code = match outcome {
                Outcome::Cancelled(CancelReason::Requested) => "cancelled",
                Outcome::Cancelled(CancelReason::Abandoned) => "aborted",
                _ => api.code,
            };
            vec![ServerFrame::Error {
                code: code.to_owned(),
                message: api.message,
                retryable: api.retryable,
                generation_id: Some(generation_id),
                client_message_id: None,
            }]
        }
    }
}

/// Moves the resume point of a generation frame to `next`, so that it also
/// covers the events up to there.
fn extend_to(frame: &mut ServerFrame, end: u64) {
    match frame {
        ServerFrame::Delta { next, .. }
        | ServerFrame::Reasoning { next, .. }
        | ServerFrame::ToolCall { next, .. }
        | ServerFrame::Usage { next, .. }
        | ServerFrame::Restart { next, .. } => *next = end,
        _ => {}
    }
}

/// Pushes `frame` to every connected member of `room` except `except`.
fn publish(room: &Room, except: Option<ConnectionId>, frame: &ServerFrame) {
    for (id, member) in &room.members {
        if Some(*id) != except
            && let Some(outbox) = &member.outbox
        {
            outbox.push(frame.clone());
        }
    }
}
