//! Routing: which provider (and which upstream model) answers a model name.
//!
//! Each configured `[[models]]` entry becomes a [`Route`]: the name clients
//! ask for and its ordered chain of [`Target`]s. Today a request goes to the
//! chain's first target; retries, fail-over along the chain, breakers and
//! timeouts per target belong here too and arrive with the resilience work.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::config::Config;
use crate::provider::{self, BuildError, Provider};

/// One (provider, upstream model) pair of a route.
#[derive(Debug, Clone)]
pub struct Target {
    /// The adapter that talks to the provider.
    pub provider: Arc<dyn Provider>,
    /// The model name the provider knows.
    pub model: String,
}

/// A model name and the targets that can serve it, in preference order.
#[derive(Debug, Clone)]
pub struct Route {
    /// What clients ask for.
    pub name: String,
    /// Never empty (config validation guarantees it).
    pub targets: Vec<Target>,
}

impl Route {
    /// The target a request goes to first.
    pub fn primary(&self) -> &Target {
        // Validation rejects routes without targets, so index 0 exists.
        &self.targets[0]
    }
}

/// All routes, by model name.
#[derive(Debug)]
pub struct Router {
    /// Sorted, so `/v1/models` lists models in a stable order.
    routes: BTreeMap<String, Route>,
}

impl Router {
    /// Builds every provider and route from a validated config.
    pub fn from_config(config: &Config) -> Result<Self, BuildError> {
        let mut providers: HashMap<&str, Arc<dyn Provider>> = HashMap::new();
        for entry in &config.providers {
            let used = config
                .models
                .iter()
                .any(|m| m.targets.iter().any(|t| t.provider == entry.name));
            // An unused provider need not have its key set.
            if used {
                providers.insert(&entry.name, provider::build(entry, &config.upstream)?);
            }
        }
        let routes = config
            .models
            .iter()
            .map(|model| {
                let targets = model
                    .targets
                    .iter()
                    .filter_map(|t| {
                        providers.get(t.provider.as_str()).map(|p| Target {
                            provider: Arc::clone(p),
                            model: t.model.clone(),
                        })
                    })
                    .collect();
                let route = Route {
                    name: model.name.clone(),
                    targets,
                };
                (model.name.clone(), route)
            })
            .collect();
        Ok(Self { routes })
    }

    /// The route for `model`, if one is configured.
    pub fn route(&self, model: &str) -> Option<&Route> {
        self.routes.get(model).filter(|r| !r.targets.is_empty())
    }

    /// Configured model names, sorted.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }
}
