//! The in-process bus: one instance, nothing crosses a process boundary.
//! Rooms, presence and replies live in the process (see `chat/`), so every
//! method here is the "no other instance" answer.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{
    Active, Bus, Claim, ClusterError, Health, Inbound, MemberKey, QuotaCount, QuotaDecision,
    RateDecision, Refreshed, RoomEvent, Session, now_ms,
};
use crate::config::Config;
use crate::generation::{Generation, GenerationId};

/// The embedded default bus.
#[derive(Debug)]
pub struct LocalBus {
    node: String,
    instance: String,
    /// Sessions of this process, with their expiry (Unix ms); the oldest
    /// are forgotten past `MAX_SESSIONS`.
    sessions: Mutex<Sessions>,
    session_ttl_ms: u64,
}

#[derive(Debug, Default)]
struct Sessions {
    by_id: HashMap<String, (Session, u64)>,
    order: VecDeque<String>,
}

/// Sessions one process remembers.
const MAX_SESSIONS: usize = 100_000;

impl LocalBus {
    /// A bus for this process alone.
    pub fn new(node: String, config: &Config) -> Self {
        let instance = format!("{node}@{}", crate::generation::epoch());
        Self {
            node,
            instance,
            sessions: Mutex::new(Sessions::default()),
            session_ttl_ms: config.chat.session_ttl_secs.saturating_mul(1000),
        }
    }
}

impl Bus for LocalBus {
    fn node(&self) -> &str {
        &self.node
    }

    fn instance(&self) -> &str {
        &self.instance
    }

    fn is_shared(&self) -> bool {
        false
    }

    fn inbound(&self) -> Option<mpsc::Receiver<Inbound>> {
        None
    }

    fn publish(&self, _conversation_id: &str, _event: RoomEvent) {}

    fn open_room<'a>(
        &'a self,
        _conversation_id: &'a str,
    ) -> BoxFuture<'a, HashMap<MemberKey, String>> {
        std::future::ready(HashMap::new()).boxed()
    }

    fn close_room(&self, _conversation_id: &str) {}

    fn refresh<'a>(
        &'a self,
        _local: &'a [(String, Vec<(u64, String)>)],
    ) -> BoxFuture<'a, Option<Refreshed>> {
        std::future::ready(None).boxed()
    }

    fn mirror(&self, _generation: &Arc<Generation>) {}

    fn follow(
        &self,
        _id: GenerationId,
    ) -> BoxFuture<'_, Result<Option<Arc<Generation>>, ClusterError>> {
        std::future::ready(Ok(None)).boxed()
    }

    fn cancel_remote(&self, _generation: &Generation) {}

    fn claim_send<'a>(
        &'a self,
        _conversation_id: &'a str,
        _client_message_id: &'a str,
    ) -> BoxFuture<'a, Claim> {
        std::future::ready(Claim::Fresh).boxed()
    }

    fn record_send(&self, _: &str, _: &str, _: &str, _: &str) {}

    fn release_send(&self, _: &str, _: &str) {}

    fn save_session(&self, session: &Session) {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let expiry = now_ms() + self.session_ttl_ms;
        let fresh = sessions
            .by_id
            .insert(session.id.clone(), (session.clone(), expiry))
            .is_none();
        if fresh {
            sessions.order.push_back(session.id.clone());
        }
        while sessions.order.len() > MAX_SESSIONS {
            if let Some(old) = sessions.order.pop_front() {
                sessions.by_id.remove(&old);
            }
        }
    }

    fn load_session<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Option<Session>> {
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let found = sessions
            .by_id
            .get(id)
            .filter(|(_, expiry)| *expiry > now_ms())
            .map(|(session, _)| session.clone());
        std::future::ready(found).boxed()
    }

    fn active<'a>(&'a self, _tenant_id: &'a str, _user_id: &'a str) -> BoxFuture<'a, Vec<Active>> {
        std::future::ready(Vec::new()).boxed()
    }

    // Shared limits: nobody to share with; `limits/` keeps them locally.

    fn rate_limit<'a>(
        &'a self,
        _key: &'a str,
        _per_minute: u32,
        _cost: u32,
    ) -> BoxFuture<'a, Option<RateDecision>> {
        std::future::ready(None).boxed()
    }

    fn reserve_quota<'a>(
        &'a self,
        _tenant_id: &'a str,
        _user_id: &'a str,
        _day: u32,
        _quota: u64,
        _estimate: u64,
    ) -> BoxFuture<'a, Option<QuotaDecision>> {
        std::future::ready(None).boxed()
    }

    fn settle_quota<'a>(
        &'a self,
        _tenant_id: &'a str,
        _user_id: &'a str,
        _day: u32,
        _estimate: u64,
        _actual: u64,
    ) -> BoxFuture<'a, bool> {
        std::future::ready(false).boxed()
    }

    fn quota_count<'a>(
        &'a self,
        _tenant_id: &'a str,
        _user_id: &'a str,
        _day: u32,
    ) -> BoxFuture<'a, Option<QuotaCount>> {
        std::future::ready(None).boxed()
    }

    fn health(&self) -> Health {
        Health {
            mode: "local",
            node: self.node.clone(),
            ok: true,
            dropped_inbound: 0,
            dropped_outbound: 0,
            recovered: 0,
            followers: 0,
            instances: 1,
        }
    }

    fn leave(&self) -> BoxFuture<'_, ()> {
        std::future::ready(()).boxed()
    }
}
