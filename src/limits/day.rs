//! The UTC day that daily token quotas and tenant budgets count in.

/// Milliseconds in a day.
const DAY_MS: u64 = 86_400_000;

/// One UTC day, as counters are keyed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Day {
    /// `yyyymmdd`, e.g. `20250131`: the key of the day's counters.
    pub yyyymmdd: u32,
    /// Seconds until the next UTC midnight (at least 1), when the day's
    /// counters start again from zero.
    pub secs_left: u64,
}

impl Day {
    /// The UTC day at `unix_ms`.
    pub fn at(unix_ms: u64) -> Self {
        let days = unix_ms / DAY_MS;
        let (year, month, day) = civil_from_days(days);
        let left_ms = DAY_MS - unix_ms % DAY_MS;
        Self {
            yyyymmdd: year * 10_000 + month * 100 + day,
            secs_left: left_ms.div_ceil(1000),
        }
    }

    /// The UTC day now (the wall clock: instances agree on it within
    /// their clock skew).
    pub fn today() -> Self {
        Self::at(crate::cluster::now_ms())
    }
}

/// Year, month (1–12) and day (1–31) of `days` since 1970-01-01
/// (Howard Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u32, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (
        u32::try_from(year).unwrap_or(u32::MAX),
        u32::try_from(month).unwrap_or(1),
        u32::try_from(day).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_utc_days_and_the_seconds_left_in_them() {
        assert_eq!(Day::at(0).yyyymmdd, 19_700_101);
        assert_eq!(Day::at(0).secs_left, 86_400);
        // 2024-02-29 (a leap day) 23:59:59.500 UTC.
        let leap = 19_782 * DAY_MS + DAY_MS - 500;
        assert_eq!(Day::at(leap).yyyymmdd, 20_240_229);
        assert_eq!(Day::at(leap).secs_left, 1);
        assert_eq!(Day::at(leap + 500).yyyymmdd, 20_240_301);
        // 2000-12-31 and 2001-01-01.
        assert_eq!(Day::at(11_322 * DAY_MS).yyyymmdd, 20_001_231);
        assert_eq!(Day::at(11_323 * DAY_MS).yyyymmdd, 20_010_101);
    }
}
