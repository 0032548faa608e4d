//! SQLite store (being written).
use super::*;
use crate::config::StoreConfig;
/// SQLite.
#[derive(Debug)]
pub struct SqliteStore;
impl SqliteStore {
    /// Opens it.
    pub async fn open(_url: &str, _config: &StoreConfig) -> Result<Self, StoreError> {
        Err(StoreError::Url("not yet".into()))
    }
}
