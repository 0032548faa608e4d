//! `Retry-After` (RFC 9110 §10.2.3): the delay a provider asks for.
//!
//! Either delta-seconds or an HTTP-date in any of the three forms RFC 9110
//! §5.6.7 requires a recipient to accept (IMF-fixdate, RFC 850, asctime). A
//! date in the past means "now" (`Duration::ZERO`); anything else
//! unparseable, including negative or fractional seconds, is `None`.
//! Delta-seconds too large to represent become 2^31 seconds, as RFC 9110
//! §1.2.2 allows. The value is not capped here: a provider asking for an
//! hour is information routing needs (to fail over rather than wait).

use std::time::{Duration, SystemTime};

/// What RFC 9110 §1.2.2 lets a recipient use for a delta-seconds value too
/// large to represent.
const DELTA_SECONDS_LIMIT: u64 = 1 << 31;

/// The delay a `Retry-After` header value asks for, relative to `now`;
/// `None` if the value is neither delta-seconds nor an HTTP-date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Only digits, so a parse error can only be overflow.
        let seconds = value.parse::<u64>().unwrap_or(DELTA_SECONDS_LIMIT);
        return Some(Duration::from_secs(seconds.min(DELTA_SECONDS_LIMIT)));
    }
    // httpdate accepts exactly RFC 9110's three forms (and so is already in
    // our tree, through hyper). A date in the past is "retry now".
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    /// Sun, 06 Nov 1994 08:49:37 GMT, the RFC's example date.
    fn rfc_example_date() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(784_111_777)
    }

    #[test]
    fn retry_after_accepts_delta_seconds() {
        let now = rfc_example_date();
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("  7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after("0", now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_clamps_enormous_delta_seconds() {
        let now = rfc_example_date();
        let limit = Some(Duration::from_secs(1 << 31));
        assert_eq!(parse_retry_after("99999999999", now), limit);
        assert_eq!(parse_retry_after("99999999999999999999999", now), limit);
    }

    #[test]
    fn retry_after_accepts_all_three_http_date_forms() {
        let now = rfc_example_date() - Duration::from_secs(30);
        let expected = Some(Duration::from_secs(30));
        for value in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_retry_after(value, now), expected, "{value}");
        }
    }

    #[test]
    fn retry_after_in_the_past_means_now() {
        let now = rfc_example_date() + Duration::from_secs(3600);
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_rejects_garbage() {
        let now = rfc_example_date();
        for value in [
            "",
            "   ",
            "soon",
            "-1",
            "+5",
            "1.5",
            "2 s",
            "0x10",
            "Sun, 06 Nov 1994 08:49:37",
            "Sun, 32 Nov 1994 08:49:37 GMT",
        ] {
            assert_eq!(parse_retry_after(value, now), None, "{value:?}");
        }
    }
}
