//! The in-process bus: one instance, nothing crosses a process boundary.
//! Rooms, presence and replies live in the process (see `chat/`), so every
//! method here is the "no other instance" answer.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{Bus, Claim, ClusterError, Health, Inbound, MemberKey, Refreshed, RoomEvent};
use crate::generation::{Generation, GenerationId};

/// The embedded default bus.
#[derive(Debug)]
pub struct LocalBus {
    node: String,
    instance: String,
}

impl LocalBus {
    /// A bus for this process alone.
    pub fn new(node: String) -> Self {
        let instance = format!("{node}@{}", crate::generation::epoch());
        Self { node, instance }
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
