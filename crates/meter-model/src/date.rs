//! UTC calendar dates and months (proleptic Gregorian), without a date crate.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const DAY_MS: i64 = 86_400_000;

/// A UTC calendar day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Date {
    year: i32,
    month: u32,
    day: u32,
}

/// A UTC calendar month: the rating period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct YearMonth {
    year: i32,
    month: u32,
}

fn is_leap(y: i32) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i32, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if is_leap(y) => 29,
        _ => 28,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Date {
    /// `None` unless year is in 1..=9999 and the day exists in that month.
    pub fn new(year: i32, month: u32, day: u32) -> Option<Self> {
        let ok = (1..=9999).contains(&year) && (1..=12).contains(&month) && day >= 1 && day <= days_in_month(year, month);
        ok.then_some(Date { year, month, day })
    }

    pub fn year(self) -> i32 {
        self.year
    }

    pub fn month(self) -> u32 {
        self.month
    }

    pub fn day(self) -> u32 {
        self.day
    }

    pub fn year_month(self) -> YearMonth {
        YearMonth { year: self.year, month: self.month }
    }

    /// The UTC day containing `ms` (milliseconds since the epoch); `None`
    /// outside years 1..=9999.
    pub fn from_millis(ms: i64) -> Option<Self> {
        let (y, m, d) = civil_from_days(ms.div_euclid(DAY_MS));
        Date::new(i32::try_from(y).ok()?, m as u32, d as u32)
    }

    /// Milliseconds since the epoch at 00:00 UTC of this day.
    pub fn start_millis(self) -> i64 {
        days_from_civil(i64::from(self.year), i64::from(self.month), i64::from(self.day)) * DAY_MS
    }
}

impl YearMonth {
    pub fn new(year: i32, month: u32) -> Option<Self> {
        Date::new(year, month, 1).map(Date::year_month)
    }

    pub fn year(self) -> i32 {
        self.year
    }

    pub fn month(self) -> u32 {
        self.month
    }

    pub fn first_day(self) -> Date {
        Date { year: self.year, month: self.month, day: 1 }
    }

    pub fn last_day(self) -> Date {
        Date { year: self.year, month: self.month, day: self.days() }
    }

    pub fn days(self) -> u32 {
        days_in_month(self.year, self.month)
    }

    /// Hours in the month (672, 696, 720 or 744): the divisor of GB-month.
    pub fn hours(self) -> u32 {
        self.days() * 24
    }

    pub fn contains(self, d: Date) -> bool {
        d.year_month() == self
    }

    /// Milliseconds since the epoch at the start of the month.
    pub fn start_millis(self) -> i64 {
        self.first_day().start_millis()
    }

    /// Milliseconds since the epoch at the start of the next month (exclusive end).
    pub fn end_millis(self) -> i64 {
        self.last_day().start_millis() + DAY_MS
    }

    /// Every day of the month, in order.
    pub fn iter_days(self) -> impl Iterator<Item = Date> {
        (1..=self.days()).map(move |day| Date { year: self.year, month: self.month, day })
    }
}

fn num<T: FromStr>(s: &str, len: usize) -> Option<T> {
    (s.len() == len && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

impl FromStr for Date {
    type Err = String;

    /// `YYYY-MM-DD`.
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not a date YYYY-MM-DD");
        let mut it = s.split('-');
        let (Some(y), Some(m), Some(d), None) = (it.next(), it.next(), it.next(), it.next()) else { return Err(err()) };
        Date::new(num(y, 4).ok_or_else(err)?, num(m, 2).ok_or_else(err)?, num(d, 2).ok_or_else(err)?).ok_or_else(err)
    }
}

impl FromStr for YearMonth {
    type Err = String;

    /// `YYYY-MM`.
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || format!("{s:?} is not a month YYYY-MM");
        let (y, m) = s.split_once('-').ok_or_else(err)?;
        YearMonth::new(num(y, 4).ok_or_else(err)?, num(m, 2).ok_or_else(err)?).ok_or_else(err)
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl fmt::Display for YearMonth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// An RFC 3339 timestamp (`2026-11-30T23:59:59.5+01:00`: `T` or a space,
/// `Z` or a numeric offset, any fraction of a second, cut to the
/// millisecond) to epoch milliseconds UTC.
pub fn parse_rfc3339_millis(s: &str) -> Result<i64, String> {
    let err = || format!("{s:?} is not an RFC 3339 timestamp (YYYY-MM-DDTHH:MM:SS[.fff](Z|+HH:MM))");
    let (date, time) = s.split_once(['T', 't', ' ']).ok_or_else(err)?;
    let date: Date = date.parse().map_err(|_| err())?;
    let (clock, offset_min) = if let Some(t) = time.strip_suffix(['Z', 'z']) {
        (t, 0)
    } else {
        let at = time.rfind(['+', '-']).ok_or_else(err)?;
        let (t, off) = time.split_at(at);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (h, m) = off[1..].split_once(':').ok_or_else(err)?;
        let (h, m): (i64, i64) = (num(h, 2).ok_or_else(err)?, num(m, 2).ok_or_else(err)?);
        if h > 23 || m > 59 {
            return Err(err());
        }
        (t, sign * (h * 60 + m))
    };
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, f)) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => (hms, f),
        Some(_) => return Err(err()),
        None => (clock, ""),
    };
    let mut it = hms.split(':');
    let (Some(h), Some(mi), Some(sec), None) = (it.next(), it.next(), it.next(), it.next()) else { return Err(err()) };
    let (h, mi, sec): (i64, i64, i64) = (num(h, 2).ok_or_else(err)?, num(mi, 2).ok_or_else(err)?, num(sec, 2).ok_or_else(err)?);
    // 60: a leap second, which the epoch's count does not have; refused.
    if h > 23 || mi > 59 || sec > 59 {
        return Err(err());
    }
    let ms: i64 = format!("{fraction:0<3}")[..3].parse().map_err(|_| err())?;
    Ok(date.start_millis() + ((h * 60 + mi - offset_min) * 60 + sec) * 1000 + ms)
}

/// Epoch milliseconds as RFC 3339 UTC: `2026-11-30T23:59:59Z`, with
/// `.fff` only when there are milliseconds.
pub fn format_rfc3339(ms: i64) -> String {
    let Some(day) = Date::from_millis(ms) else { return format!("{ms} ms") };
    let in_day = ms - day.start_millis();
    let (secs, millis) = (in_day / 1000, in_day % 1000);
    let clock = format!("{day}T{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if millis == 0 {
        clock + "Z"
    } else {
        format!("{clock}.{millis:03}Z")
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC; `+00:00` accepted for `Z`) to epoch milliseconds.
pub fn parse_utc_millis(s: &str) -> Result<i64, String> {
    let err = || format!("{s:?} is not a UTC time YYYY-MM-DDTHH:MM:SSZ");
    let (date, time) = s.split_once(['T', ' ']).ok_or_else(err)?;
    let time = time.strip_suffix('Z').or_else(|| time.strip_suffix("+00:00")).ok_or_else(err)?;
    let date: Date = date.parse().map_err(|_| err())?;
    let mut it = time.split(':');
    let (Some(h), Some(mi), Some(sec), None) = (it.next(), it.next(), it.next(), it.next()) else { return Err(err()) };
    let (h, mi, sec): (i64, i64, i64) = (num(h, 2).ok_or_else(err)?, num(mi, 2).ok_or_else(err)?, num(sec, 2).ok_or_else(err)?);
    if h > 23 || mi > 59 || sec > 59 {
        return Err(err());
    }
    Ok(date.start_millis() + ((h * 60 + mi) * 60 + sec) * 1000)
}

/// Text of a TOML date or datetime, or of a string, whichever the file used.
pub fn toml_text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match toml::Value::deserialize(d)? {
        toml::Value::String(s) => Ok(s),
        toml::Value::Datetime(dt) => Ok(dt.to_string()),
        other => Err(serde::de::Error::custom(format!("expected a date, found {}", other.type_str()))),
    }
}

impl<'de> Deserialize<'de> for Date {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        toml_text(d)?.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Date {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for YearMonth {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps_parse_to_utc_milliseconds() {
        let base = parse_utc_millis("2026-11-30T23:59:59Z").expect("base");
        assert_eq!(parse_rfc3339_millis("2026-11-30T23:59:59Z"), Ok(base));
        assert_eq!(parse_rfc3339_millis("2026-11-30t23:59:59.5z"), Ok(base + 500));
        assert_eq!(parse_rfc3339_millis("2026-12-01T00:59:59.123456+01:00"), Ok(base + 123));
        assert_eq!(parse_rfc3339_millis("2026-11-30T20:29:59-03:30"), Ok(base));
        for bad in [
            "2026-11-30",
            "2026-11-30T23:59:59",
            "2026-11-30T24:00:00Z",
            "2026-11-30T23:59:60Z",
            "2026-11-30T23:59:59.Z",
            "2026-11-30T23:59:59+0100",
        ] {
            assert!(parse_rfc3339_millis(bad).is_err(), "{bad}");
        }
        assert_eq!(format_rfc3339(base), "2026-11-30T23:59:59Z");
        assert_eq!(format_rfc3339(base + 7), "2026-11-30T23:59:59.007Z");
        assert_eq!(parse_rfc3339_millis(&format_rfc3339(base + 7)), Ok(base + 7));
    }
    use proptest::prelude::*;

    #[test]
    fn month_lengths_and_hours() {
        let feb: YearMonth = "2026-02".parse().unwrap();
        assert_eq!((feb.days(), feb.hours()), (28, 672));
        assert_eq!("2024-02".parse::<YearMonth>().unwrap().days(), 29);
        assert_eq!("2026-03".parse::<YearMonth>().unwrap().hours(), 744);
        assert_eq!(feb.start_millis(), 1_769_904_000_000);
        assert_eq!(feb.end_millis(), "2026-03".parse::<YearMonth>().unwrap().start_millis());
        assert!("2026-02-29".parse::<Date>().is_err());
        assert!("2026-2-01".parse::<Date>().is_err());
        assert!("2026-13".parse::<YearMonth>().is_err());
        assert_eq!(parse_utc_millis("2026-02-01T00:01:02Z").unwrap(), 1_769_904_062_000);
    }

    proptest! {
        #[test]
        fn millis_round_trip(days in -700_000i64..2_900_000) {
            let ms = days * DAY_MS;
            let d = Date::from_millis(ms + 12_345).unwrap();
            prop_assert_eq!(d.start_millis(), ms);
            prop_assert_eq!(d.to_string().parse::<Date>().unwrap(), d);
        }
    }
}
