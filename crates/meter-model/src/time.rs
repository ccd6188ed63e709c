//! The clock, and the instants and durations users type.

use std::time::Duration;

use crate::date::Date;
use crate::Millis;

/// Milliseconds in a UTC day.
pub const DAY_MS: i64 = 86_400_000;

/// Milliseconds since the epoch from the wall clock.
pub fn now_ms() -> Millis {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Midnight UTC of the day holding `ms`.
pub fn day_floor(ms: Millis) -> Millis {
    ms - ms.rem_euclid(DAY_MS)
}

/// `YYYY-MM-DD` for epoch milliseconds (the calendar is [`Date`], shared
/// with the rating periods).
pub fn format_date(ms: i64) -> String {
    Date::from_millis(ms).map_or_else(|| format!("{ms} ms"), |d| d.to_string())
}

/// `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS]Z` (UTC) or epoch seconds, to epoch
/// milliseconds.
pub fn parse_instant(s: &str) -> Result<i64, String> {
    if let Ok(secs) = s.parse::<i64>() {
        return secs.checked_mul(1000).ok_or_else(|| format!("{s:?} seconds is outside the calendar"));
    }
    let err = || format!("{s:?} is not YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)");
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.strip_suffix('Z').ok_or_else(err)?)),
        None => (s, None),
    };
    let date: Date = date.parse().map_err(|_| err())?;
    let mut ms = date.start_millis();
    if let Some(t) = time {
        let hms: Vec<i64> = t.split(':').map(str::parse).collect::<Result<_, _>>().map_err(|_| err())?;
        let (h, mi, sec) = match hms[..] {
            [h, mi] => (h, mi, 0),
            [h, mi, sec] => (h, mi, sec),
            _ => return Err(err()),
        };
        if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..60).contains(&sec) {
            return Err(err());
        }
        ms += ((h * 60 + mi) * 60 + sec) * 1000;
    }
    Ok(ms)
}

/// `90s`, `10m`, `2h`, `1d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration like 90s, 10m, 2h or 1d");
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| err())?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(err()),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dates_times_and_durations() {
        assert_eq!(parse_instant("1970-01-01"), Ok(0));
        assert_eq!(parse_instant("2026-11-26"), Ok(1_795_651_200_000));
        assert_eq!(parse_instant("2026-11-26T01:02:03Z"), Ok(1_795_651_200_000 + 3_723_000));
        assert!(parse_instant("2026-13-01").is_err());
        assert!(parse_instant("2026-02-30").is_err());
        assert!(parse_instant("yesterday").is_err());
        assert_eq!(format_date(1_795_651_200_000 + 5), "2026-11-26");
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("1w").is_err());
    }
}
