//! Concurrency caps: connections open at once per user and per tenant, on
//! this instance. A [`ConnectionPermit`] holds one slot of each and gives
//! them back when dropped; a count that falls to zero leaves the map, so
//! the maps hold only principals with a connection open.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{Bound, Limited};

/// Open connections per user and per tenant.
#[derive(Debug, Default)]
pub(super) struct Caps {
    /// One lock for both counts, so a connection takes (or gives back) its
    /// user's and its tenant's slot together. Held for a map lookup only.
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    /// Per (tenant, user): connections open now (never 0: pruned).
    users: HashMap<(String, String), usize>,
    /// Per tenant: connections open now (never 0: pruned).
    tenants: HashMap<String, usize>,
}

impl Caps {
    /// Takes a slot for a connection of `user` of `tenant`, unless either
    /// already has `max_user` / `max_tenant` open (0: no cap).
    pub(super) fn acquire(
        self: &Arc<Self>,
        tenant: &str,
        user: &str,
        max_user: usize,
        max_tenant: usize,
    ) -> Result<ConnectionPermit, Limited> {
        let mut open = self.lock();
        let user_key = (tenant.to_owned(), user.to_owned());
        let tenant_open = open.tenants.get(tenant).copied().unwrap_or(0);
        let user_open = open.users.get(&user_key).copied().unwrap_or(0);
        let refused = if max_user > 0 && user_open >= max_user {
            Some((Bound::UserConnections, max_user))
        } else if max_tenant > 0 && tenant_open >= max_tenant {
            Some((Bound::TenantConnections, max_tenant))
        } else {
            None
        };
        if let Some((bound, limit)) = refused {
            return Err(Limited {
                bound,
                limit: u64::try_from(limit).unwrap_or(u64::MAX),
                remaining: 0,
                // A slot frees when another connection closes: no time to
                // promise.
                retry_after: None,
                reset_secs: None,
            });
        }
        *open.users.entry(user_key).or_default() += 1;
        *open.tenants.entry(tenant.to_owned()).or_default() += 1;
        drop(open);
        Ok(ConnectionPermit {
            caps: Arc::clone(self),
            tenant: tenant.to_owned(),
            user: user.to_owned(),
        })
    }

    fn release(&self, tenant: &str, user: &str) {
        let mut open = self.lock();
        let user_key = (tenant.to_owned(), user.to_owned());
        if let Some(count) = open.users.get_mut(&user_key) {
            *count -= 1;
            if *count == 0 {
                open.users.remove(&user_key);
            }
        }
        if let Some(count) = open.tenants.get_mut(tenant) {
            *count -= 1;
            if *count == 0 {
                open.tenants.remove(tenant);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One open connection's slot in its user's and its tenant's cap; dropping
/// it (when the connection closes, however it closes) frees both.
pub struct ConnectionPermit {
    caps: Arc<Caps>,
    tenant: String,
    user: String,
}

impl fmt::Debug for ConnectionPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionPermit")
            .field("tenant", &self.tenant)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.caps.release(&self.tenant, &self.user);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_pruned_when_the_last_permit_drops() {
        let caps = Arc::new(Caps::default());
        let a = caps.acquire("t", "u1", 2, 3).unwrap();
        let b = caps.acquire("t", "u1", 2, 3).unwrap();
        let c = caps.acquire("t", "u2", 2, 3).unwrap();
        assert_eq!(
            caps.acquire("t", "u1", 2, 3).unwrap_err().bound,
            Bound::UserConnections
        );
        assert_eq!(
            caps.acquire("t", "u3", 2, 3).unwrap_err().bound,
            Bound::TenantConnections
        );
        {
            let open = caps.lock();
            assert_eq!(open.users.len(), 2);
            assert_eq!(open.tenants.get("t"), Some(&3));
        }
        drop((a, b, c));
        let open = caps.lock();
        assert!(open.users.is_empty(), "{:?}", open.users);
        assert!(open.tenants.is_empty(), "{:?}", open.tenants);
    }

    #[test]
    fn zero_means_no_cap() {
        let caps = Arc::new(Caps::default());
        let permits: Vec<_> = (0..100)
            .map(|_| caps.acquire("t", "u", 0, 0).unwrap())
            .collect();
        assert_eq!(caps.lock().users.get(&("t".into(), "u".into())), Some(&100));
        drop(permits);
        assert!(caps.lock().tenants.is_empty());
    }
}
