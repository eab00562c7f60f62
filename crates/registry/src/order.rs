//! Istio's precedence among services that claim the same listener: the oldest
//! `creationTimestamp` first, then the name, then the namespace.

use std::sync::Arc;

/// Where a service stands in Istio's order; the smaller value wins a conflict.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Age {
    /// Seconds and nanoseconds since the Unix epoch; a missing or unreadable timestamp is
    /// Go's zero time, older than any real one.
    created: (i64, u32),
    /// The service name: the host for a ServiceEntry (one service per host), the
    /// Service's name for Kubernetes.
    name: Arc<str>,
    namespace: Arc<str>,
}

impl Age {
    /// The age of a service created at `timestamp` (RFC 3339).
    pub(crate) fn new(timestamp: Option<&str>, name: &str, namespace: &str) -> Age {
        Age {
            created: timestamp.and_then(rfc3339).unwrap_or((i64::MIN, 0)),
            name: name.into(),
            namespace: namespace.into(),
        }
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` into seconds and nanoseconds since
/// the Unix epoch.
fn rfc3339(text: &str) -> Option<(i64, u32)> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(range)?;
        digits.iter().try_fold(0i64, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    };
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(i, c)| b.get(i) != Some(&c))
        || !matches!(b.get(10), Some(b'T' | b't' | b' '))
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut nanos = 0u32;
    if let Some(fraction) = rest.strip_prefix('.') {
        let len = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if len == 0 {
            return None;
        }
        for (i, d) in fraction.bytes().take(len.min(9)).enumerate() {
            nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &fraction[len..];
    }
    let offset = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let digits = [*h1, *h2, *m1, *m2];
            if !digits.iter().all(u8::is_ascii_digit) {
                return None;
            }
            let [h1, h2, m1, m2] = digits.map(|d| i64::from(d - b'0'));
            let minutes = (h1 * 10 + h2) * 60 + m1 * 10 + m2;
            if *sign == b'-' {
                -minutes * 60
            } else {
                minutes * 60
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some((
        days * 86_400 + hour * 3600 + minute * 60 + second - offset,
        nanos,
    ))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rfc3339() {
        assert_eq!(rfc3339("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(rfc3339("2020-01-01T00:00:00Z"), Some((1_577_836_800, 0)));
        assert_eq!(rfc3339("2000-02-29T12:30:15Z"), Some((951_827_415, 0)));
        assert_eq!(
            rfc3339("2020-01-01T02:00:00.25+02:00"),
            Some((1_577_836_800, 250_000_000))
        );
        assert_eq!(
            rfc3339("2019-12-31T23:00:00-01:00"),
            Some((1_577_836_800, 0))
        );
        for bad in [
            "",
            "2020-01-01",
            "2020-01-01T00:00:00",
            "2020-13-01T00:00:00Z",
            "2020-01-01T24:00:00Z",
            "2020-01-01T00:00:00.Z",
            "2020-01-01T00:00:00+0200",
            "2020-01-01T00:00:00Zjunk",
            "२०२०-01-01T00:00:00Z",
        ] {
            assert_eq!(rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn oldest_then_name_then_namespace() {
        let old = Age::new(Some("2010-01-01T00:00:00Z"), "z.com", "z");
        let new = Age::new(Some("2024-01-01T00:00:00Z"), "a.com", "a");
        let missing = Age::new(None, "m.com", "m");
        let unreadable = Age::new(Some("yesterday"), "n.com", "m");
        assert!(missing < old && old < new);
        assert!(missing < unreadable, "both as Go's zero time, then by name");
        assert!(Age::new(None, "a.com", "z") < Age::new(None, "b.com", "a"));
        assert!(Age::new(None, "a.com", "a") < Age::new(None, "a.com", "b"));
    }
}
