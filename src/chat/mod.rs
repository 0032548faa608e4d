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
//! This is the single-instance implementation; the cluster work fans rooms
//! out across instances.

mod outbox;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use outbox::{Outbox, Popped};

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
    /// Presence is per user.
    user_id: String,
    /// Where the room's events go.
    outbox: Arc<Outbox>,
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
        }
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
        let rejoined = room.members.contains_key(&id);
        room.members.insert(
            id,
            Member {
                user_id: owner.user_id.clone(),
                outbox: Arc::clone(outbox),
            },
        );
        let mut users: Vec<String> = room
            .members
            .values()
            .map(|m| m.user_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        users.sort();
        let devices = room.members.len();
        outbox.push(ServerFrame::Presence {
            conversation_id: conversation_id.to_owned(),
            event: "snapshot".into(),
            users,
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
        if !rejoined {
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
        }
        Ok(())
    }

    /// Unsubscribes connection `id` from a conversation.
    pub fn unsubscribe(&self, id: ConnectionId, conversation_id: &str) {
        if let Some(mine) = lock(&self.subscriptions).get_mut(&id) {
            mine.remove(conversation_id);
        }
        self.leave(id, conversation_id);
    }

    /// Removes connection `id` from every room.
    pub fn disconnect(&self, id: ConnectionId) {
        let conversations = lock(&self.subscriptions).remove(&id).unwrap_or_default();
        for conversation_id in conversations {
            self.leave(id, &conversation_id);
        }
    }

    fn leave(&self, id: ConnectionId, conversation_id: &str) {
        let mut rooms = lock(&self.rooms);
        let Some(room) = rooms.get_mut(conversation_id) else {
            return;
        };
        let Some(member) = room.members.remove(&id) else {
            return;
        };
        let devices = room.members.len();
        publish(
            room,
            None,
            &ServerFrame::Presence {
                conversation_id: conversation_id.to_owned(),
                event: "leave".into(),
                users: vec![member.user_id],
                devices,
            },
        );
        prune(&mut rooms);
    }

    /// Rooms held now (for tests and metrics).
    pub fn rooms(&self) -> usize {
        let mut rooms = lock(&self.rooms);
        prune(&mut rooms);
        rooms.len()
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
        owner: &Owner,
        conversation_id: &str,
        content: String,
        client_message_id: String,
        model: Option<String>,
    ) -> Result<ServerFrame, ChatError> {
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
        let slot = self.reserve(owner)?;
        let history = self.history(owner, conversation_id).await?;

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
        // Members attach their own cursors when they see `reply`.
        drop(subscriber);
        let generation_id = generation.id().to_string();
        slot.fill(&generation);

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
        let mut rooms = lock(&self.rooms);
        prune(&mut rooms);
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
                message: crate::http::conversations::message_json(&message),
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

    /// Forgets everything live about a deleted conversation: its room (and
    /// the history cached there), its running replies (cancelled) and the
    /// sends remembered for it. Members are told and unsubscribed.
    pub fn forget_conversation(&self, conversation_id: &str) {
        let room = lock(&self.rooms).remove(conversation_id);
        if let Some(room) = room {
            for generation in &room.replies {
                generation.cancel(CancelReason::Requested);
            }
            let gone = ChatError::NotFound.frame(None);
            for (id, member) in &room.members {
                member.outbox.push(gone.clone());
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
                room.members.values().any(|m| m.user_id == owner.user_id)
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
            // in it yet. Wait for what is journaled, within a bound.
            if let Some(persister) = &self.persister {
                let flushed = tokio::time::timeout(HISTORY_FLUSH_WAIT, persister.flushed()).await;
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
    /// Whether `owner` may resume generation `id` at (`epoch`, `offset`);
    /// the error says why the client must reload from history instead.
    pub fn resumable(
        &self,
        owner: &Owner,
        id: &str,
        epoch: u64,
        offset: u64,
    ) -> Result<(), &'static str> {
        let generation = self
            .generation_of(owner, id)
            .ok_or("the reply is no longer held: reload the conversation from history")?;
        if epoch != generation.epoch() {
            return Err("unknown epoch: reload the conversation from history");
        }
        if offset > generation.len() {
            return Err("offset beyond the reply: reload the conversation from history");
        }
        Ok(())
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

/// Forgets rooms nobody is in and nothing is running in (their history
/// reloads from the store when someone comes back). Called as members
/// leave and as sends start, so rooms left while a reply ran (or used only
/// over SSE) are forgotten once it ends: the map stays bounded by what is
/// live.
fn prune(rooms: &mut HashMap<String, Room>) {
    rooms.retain(|_, room| {
        !room.members.is_empty() || room.replies.iter().any(|g| g.outcome().is_none())
    });
}

/// Pushes `frame` to every member of `room` except `except`.
fn publish(room: &Room, except: Option<ConnectionId>, frame: &ServerFrame) {
    for (id, member) in &room.members {
        if Some(*id) != except {
            member.outbox.push(frame.clone());
        }
    }
}
