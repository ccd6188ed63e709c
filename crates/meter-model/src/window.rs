//! Tumbling event-time windows aligned to the Unix epoch (UTC).

use crate::Millis;

pub const MINUTE_MS: Millis = 60_000;
pub const HOUR_MS: Millis = 60 * MINUTE_MS;
pub const DAY_MS: Millis = 24 * HOUR_MS;

/// The window sizes the processor maintains. Every event lands in exactly
/// one window of each granularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    pub fn size_ms(self) -> Millis {
        match self {
            Granularity::Minute => MINUTE_MS,
            Granularity::Hour => HOUR_MS,
            Granularity::Day => DAY_MS,
        }
    }

    /// The start of the window containing `t`. Uses Euclidean remainder so
    /// that times before the epoch still fall into the window below them.
    pub fn window_start(self, t: Millis) -> Millis {
        t - t.rem_euclid(self.size_ms())
    }

    /// The Avro enum symbol.
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "MINUTE",
            Granularity::Hour => "HOUR",
            Granularity::Day => "DAY",
        }
    }

    /// Position in the Avro enum's symbol list.
    pub fn index(self) -> i32 {
        match self {
            Granularity::Minute => 0,
            Granularity::Hour => 1,
            Granularity::Day => 2,
        }
    }

    pub fn from_index(i: i64) -> Option<Self> {
        match i {
            0 => Some(Granularity::Minute),
            1 => Some(Granularity::Hour),
            2 => Some(Granularity::Day),
            _ => None,
        }
    }

    /// The ClickHouse table that stores windows of this size.
    pub fn table(self) -> &'static str {
        match self {
            Granularity::Minute => "usage_minute",
            Granularity::Hour => "usage_hour",
            Granularity::Day => "usage_day",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_time_falls_in_exactly_its_window(t in -10_000_000_000_000i64..10_000_000_000_000i64) {
            for g in Granularity::ALL {
                let start = g.window_start(t);
                prop_assert!(start <= t && t < start + g.size_ms());
                prop_assert_eq!(start.rem_euclid(g.size_ms()), 0);
            }
        }

        #[test]
        fn minute_windows_nest_in_hours_and_days(t in 0i64..5_000_000_000_000i64) {
            let m = Granularity::Minute.window_start(t);
            prop_assert_eq!(Granularity::Hour.window_start(m), Granularity::Hour.window_start(t));
            prop_assert_eq!(Granularity::Day.window_start(m), Granularity::Day.window_start(t));
        }
    }

    #[test]
    fn negative_times_round_down() {
        assert_eq!(Granularity::Minute.window_start(-1), -MINUTE_MS);
    }
}
