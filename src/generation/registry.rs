//! The registry of live generations on this instance.
//!
//! It starts generations (each driver is a task on the registry's
//! `TaskTracker`, so shutdown can wait for them), finds them by id for
//! resume, bounds how many exist at once, and forgets each one when its
//! resume window has passed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Generation, GenerationId, Spec, Subscriber};
use crate::config::GenerationConfig;
use crate::provider::ChatRequest;
use crate::routing::{AfterCommit, Ledger, Route, Router};
use crate::store::Owner;
use crate::store::persister::Persister;
use crate::usage::Pricing;

/// Per-start choices that differ between transports.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// How long the generation runs on with no subscriber.
    pub grace: Duration,
    /// How long it stays resumable after it ends.
    pub retain: Duration,
    /// What to do when an upstream fails mid-answer.
    pub after_commit: AfterCommit,
    /// Where the finished reply is stored, if anywhere.
    pub persist: Option<PersistTo>,
}

/// Where a generation stores its assistant message when it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistTo {
    /// The conversation's owner.
    pub owner: Owner,
    /// The conversation the reply belongs to.
    pub conversation_id: String,
}

/// Why a generation could not start.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `generation.max_live` generations exist already.
    #[error("too many generations in flight on this instance (limit {limit})")]
    Full {
        /// The configured bound.
        limit: usize,
    },
    /// The gateway is shutting down and starts nothing new.
    #[error("the gateway is shutting down")]
    ShuttingDown,
}

/// Live and recently finished generations.
#[derive(Debug)]
pub struct Registry {
    /// Generations by id. A std mutex: held only to insert, look up, remove.
    live: Mutex<HashMap<GenerationId, Arc<Generation>>>,
    /// Owns every driver task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Parent of every generation's cancel token; cancelled at shutdown.
    shutdown: CancellationToken,
    config: GenerationConfig,
    /// Prices for every generation's usage record.
    pricing: Arc<Pricing>,
    /// Where generations hand their finished replies, when persistence is on.
    persister: Option<Persister>,
}

impl Registry {
    /// An empty registry bounded by `config`, pricing usage with `pricing`.
    pub fn new(config: GenerationConfig, pricing: Pricing) -> Self {
        Self {
            live: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            config,
            pricing: Arc::new(pricing),
            persister: None,
        }
    }

    /// The same registry, storing finished replies through `persister`.
    pub fn with_persister(mut self, persister: Persister) -> Self {
        self.persister = Some(persister);
        self
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<GenerationId, Arc<Generation>>> {
        // Each section is one map operation; a poisoned map is still whole.
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a generation that answers `request` along `route`, and
    /// returns its first subscriber (reading from offset 0).
    pub fn start(
        self: &Arc<Self>,
        router: &Arc<Router>,
        route: Arc<Route>,
        request: ChatRequest,
        options: StartOptions,
    ) -> Result<Subscriber, RegistryError> {
        if self.shutdown.is_cancelled() {
            return Err(RegistryError::ShuttingDown);
        }
        let ledger = Arc::new(Ledger::default());
        let spec = Spec {
            model: route.name.clone(),
            dispatch: router.dispatch(route, request, options.after_commit, Arc::clone(&ledger)),
            ledger,
            pricing: Arc::clone(&self.pricing),
            persist: options
                .persist
                .clone()
                .and_then(|to| self.persister.clone().map(|persister| (persister, to))),
            persist_to: options.persist.clone(),
            grace: options.grace,
            max_frame_bytes: self.config.max_frame_bytes,
            max_reply_bytes: self.config.max_reply_bytes,
            cancel: self.shutdown.child_token(),
        };
        let (generation, subscriber, driver) = {
            let mut live = self.lock();
            // The limit counts running replies only: finished ones kept for
            // resume must not lock new ones out. Those are bounded apart:
            // past as many again, the oldest finished is forgotten first
            // (ids are UUIDv7, so the smallest is the oldest).
            let running = live.values().filter(|g| g.outcome().is_none()).count();
            if running >= self.config.max_live {
                return Err(RegistryError::Full {
                    limit: self.config.max_live,
                });
            }
            while live.len() >= self.config.max_live.saturating_mul(2) {
                let oldest = live
                    .iter()
                    .filter(|(_, g)| g.outcome().is_some())
                    .map(|(id, _)| *id)
                    .min();
                match oldest {
                    Some(id) => {
                        live.remove(&id);
                    }
                    None => break,
                }
            }
            let (generation, subscriber, driver) = Generation::create(spec);
            crate::metrics::get().generations_started.inc();
            live.insert(generation.id(), Arc::clone(&generation));
            (generation, subscriber, driver)
        };
        let registry = Arc::clone(self);
        // The reply's work logs under the request that started it.
        let span = tracing::info_span!("generation", generation_id = %generation.id());
        self.tasks.spawn(tracing::Instrument::instrument(
            async move {
                driver.await;
                // Keep the finished log resumable for a while, unless we are
                // shutting down.
                if !options.retain.is_zero() {
                    tokio::select! {
                        () = tokio::time::sleep(options.retain) => {}
                        () = registry.shutdown.cancelled() => {}
                    }
                }
                registry.lock().remove(&generation.id());
            },
            span,
        ));
        Ok(subscriber)
    }

    /// The generation with `id`, if it is live or still resumable.
    pub fn get(&self, id: GenerationId) -> Option<Arc<Generation>> {
        self.lock().get(&id).cloned()
    }

    /// Generations currently held (running or within their resume window).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Generations still streaming (not yet ended).
    pub fn running(&self) -> usize {
        self.lock()
            .values()
            .filter(|g| g.outcome().is_none())
            .count()
    }

    /// Whether no generation is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops accepting generations, cancels every running one, and waits
    /// (up to `deadline`) for their tasks to finish.
    pub async fn shutdown(&self, deadline: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.tasks.len(),
                "generations still running at the shutdown deadline"
            );
        }
    }

    /// A token cancelled when the registry shuts down.
    pub fn shutting_down(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The generation settings this registry enforces.
    pub fn config(&self) -> &GenerationConfig {
        &self.config
    }
}
