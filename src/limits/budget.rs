//! Tenant spending alerts: the cost of every reply is added to its
//! tenant's UTC day on this instance; crossing `alert_at × daily_usd`
//! logs a warning once that day, and reaching the whole budget once more.
//! Alerts only: nothing is refused for spending.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::config::BudgetConfig;

/// Budgets and what each tenant has spent today.
#[derive(Debug)]
pub(super) struct Budgets {
    /// Tenants with a budget; others are not tracked at all.
    budgets: HashMap<String, BudgetConfig>,
    /// Per tenant with a budget: today's spending.
    spent: Mutex<HashMap<String, Spent>>,
    /// Thresholds crossed (for metrics).
    alerts: AtomicU64,
}

/// One tenant's day.
#[derive(Debug, Clone, Copy, Default)]
struct Spent {
    /// `yyyymmdd`.
    day: u32,
    usd: f64,
    /// `alert_at` crossed today (warned).
    alerted: bool,
    /// The whole budget reached today (warned).
    exhausted: bool,
}

impl Budgets {
    pub(super) fn new(budgets: &[BudgetConfig]) -> Self {
        Self {
            budgets: budgets
                .iter()
                .map(|budget| (budget.tenant.clone(), budget.clone()))
                .collect(),
            spent: Mutex::new(HashMap::new()),
            alerts: AtomicU64::new(0),
        }
    }

    /// Adds `usd` to `tenant`'s spending on `day` (`yyyymmdd`); warns at
    /// each threshold crossed.
    pub(super) fn record(&self, tenant: &str, usd: f64, day: u32) {
        let Some(budget) = self.budgets.get(tenant) else {
            return;
        };
        if !usd.is_finite() || usd <= 0.0 {
            return;
        }
        let mut spent = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        let today = spent.entry(tenant.to_owned()).or_default();
        if today.day != day {
            *today = Spent {
                day,
                ..Spent::default()
            };
        }
        today.usd += usd;
        let total = today.usd;
        let alert = !today.alerted && total >= budget.alert_at * budget.daily_usd;
        let exhausted = !today.exhausted && total >= budget.daily_usd;
        today.alerted |= alert;
        today.exhausted |= exhausted;
        drop(spent);
        if alert || exhausted {
            let labels = crate::metrics::TenantLabels {
                tenant: crate::metrics::get().tenant(tenant),
            };
            crate::metrics::get()
                .budget_alerts
                .get_or_create(&labels)
                .inc_by(u64::from(alert) + u64::from(exhausted));
        }
        if alert {
            self.alerts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                tenant,
                spent_usd = total,
                daily_usd = budget.daily_usd,
                alert_at = budget.alert_at,
                "tenant budget: alert threshold crossed today"
            );
        }
        if exhausted {
            self.alerts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                tenant,
                spent_usd = total,
                daily_usd = budget.daily_usd,
                "tenant budget: the whole daily budget is spent"
            );
        }
    }

    /// Thresholds crossed since start.
    pub(super) fn alerts(&self) -> u64 {
        self.alerts.load(Ordering::Relaxed)
    }

    /// Forgets spending of days gone by.
    pub(super) fn housekeep(&self, today: u32) {
        self.spent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, spent| spent.day >= today);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets() -> Budgets {
        Budgets::new(&[BudgetConfig {
            tenant: "acme".into(),
            daily_usd: 10.0,
            alert_at: 0.8,
        }])
    }

    #[test]
    fn alerts_once_at_the_threshold_and_once_at_the_whole_budget_per_day() {
        let budgets = budgets();
        budgets.record("acme", 7.0, 1);
        assert_eq!(budgets.alerts(), 0);
        budgets.record("acme", 1.0, 1);
        assert_eq!(budgets.alerts(), 1, "8 of 10 crosses 80 %");
        budgets.record("acme", 1.0, 1);
        assert_eq!(budgets.alerts(), 1, "no second alert for the threshold");
        budgets.record("acme", 1.5, 1);
        assert_eq!(budgets.alerts(), 2, "100 % alerts once more");
        budgets.record("acme", 5.0, 1);
        assert_eq!(budgets.alerts(), 2);
        // A new day: both thresholds again (crossed at once here).
        budgets.record("acme", 20.0, 2);
        assert_eq!(budgets.alerts(), 4);
    }

    #[test]
    fn ignores_tenants_without_a_budget_and_nonsense_costs() {
        let budgets = budgets();
        budgets.record("other", 1e9, 1);
        budgets.record("acme", f64::NAN, 1);
        budgets.record("acme", -50.0, 1);
        budgets.record("acme", f64::INFINITY, 1);
        assert_eq!(budgets.alerts(), 0);
        assert!(budgets.spent.lock().unwrap().get("other").is_none());
        budgets.record("acme", 1.0, 1);
        assert_eq!(budgets.spent.lock().unwrap()["acme"].usd, 1.0);
        budgets.housekeep(2);
        assert!(budgets.spent.lock().unwrap().is_empty());
    }
}
