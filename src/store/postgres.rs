//! PostgreSQL store (being written).
use super::*;
use crate::config::StoreConfig;
/// PostgreSQL.
#[derive(Debug)]
pub struct PostgresStore;
impl PostgresStore {
    /// Opens it.
    pub async fn open(_url: &str, _config: &StoreConfig) -> Result<Self, StoreError> {
        Err(StoreError::Url("not yet".into()))
    }
}
