//! Google Gemini `streamGenerateContent?alt=sse` (placeholder: the adapter
//! is being written).

use futures_util::future::BoxFuture;

use super::{BuildError, ChatRequest, ErrorClass, EventStream, Provider, ProviderError};
use crate::config::{ProviderConfig, UpstreamConfig};

/// A Gemini upstream.
#[derive(Debug)]
pub struct GeminiProvider {
    name: String,
}

impl GeminiProvider {
    /// Builds the adapter from its configuration.
    pub fn new(config: &ProviderConfig, _upstream: &UpstreamConfig) -> Result<Self, BuildError> {
        Ok(Self {
            name: config.name.clone(),
        })
    }
}

impl Provider for GeminiProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn stream(&self, _request: ChatRequest) -> BoxFuture<'_, Result<EventStream, ProviderError>> {
        Box::pin(async move {
            Err(ProviderError::new(
                ErrorClass::InvalidRequest,
                "the Gemini adapter is not built yet",
            ))
        })
    }
}
