//! Conversions from a usage type's base unit (what events count) to the
//! pricing unit the price book quotes.
//!
//! Only the pairs listed in [`Conversion::find`] exist; anything else (for
//! example a future base unit `milliseconds`) is an error, never a guess.
//! "GB" is the binary gigabyte, 2^30 bytes, as cloud providers bill it.

use rust_decimal::Decimal;

use crate::date::YearMonth;
use crate::decimal::internal;
use crate::error::{Error, Result};

const GIB: i64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Conversion {
    /// seconds→seconds, bytes→bytes, requests→requests.
    Identity,
    /// seconds→hours: / 3600.
    SecondsToHours,
    /// bytes→GB: / 2^30.
    BytesToGb,
    /// byte-seconds→GB-month: / (2^30 × 3600 × hours in the rated calendar
    /// month), so a GB stored for the whole month is exactly one GB-month in
    /// February and in March alike.
    ByteSecondsToGbMonth,
    /// milliseconds→hours (e.g. vCPU-milliseconds to vCPU-hours): / 3,600,000.
    MillisecondsToHours,
    /// byte-seconds→GB-hours: / (2^30 × 3600).
    ByteSecondsToGbHours,
}

impl Conversion {
    /// The conversion from `base_unit` (as the catalog spells it) to `pricing_unit`.
    pub fn find(base_unit: &str, pricing_unit: &str) -> Option<Self> {
        match (base_unit, pricing_unit) {
            ("seconds", "seconds") | ("bytes", "bytes") | ("requests", "requests") => Some(Conversion::Identity),
            ("seconds", "hours") => Some(Conversion::SecondsToHours),
            ("bytes", "GB") => Some(Conversion::BytesToGb),
            ("byte-seconds", "GB-month") => Some(Conversion::ByteSecondsToGbMonth),
            ("milliseconds", "vCPU-hours") => Some(Conversion::MillisecondsToHours),
            ("byte-seconds", "GB-hours") => Some(Conversion::ByteSecondsToGbHours),
            _ => None,
        }
    }

    /// Base units per pricing unit in `month`.
    pub fn divisor(self, month: YearMonth) -> Decimal {
        match self {
            Conversion::Identity => Decimal::ONE,
            Conversion::SecondsToHours => Decimal::from(3600),
            Conversion::BytesToGb => Decimal::from(GIB),
            Conversion::ByteSecondsToGbMonth => Decimal::from(GIB) * Decimal::from(3600 * i64::from(month.hours())),
            Conversion::MillisecondsToHours => Decimal::from(3_600_000),
            Conversion::ByteSecondsToGbHours => Decimal::from(GIB) * Decimal::from(3600),
        }
    }

    /// `base` base units in pricing units, at the internal scale.
    pub fn to_pricing(self, base: i128, month: YearMonth) -> Result<Decimal> {
        let overflow = || Error::Overflow { context: format!("converting {base} base units") };
        let q = Decimal::try_from_i128_with_scale(base, 0).map_err(|_| overflow())?;
        let q = q.checked_div(self.divisor(month)).ok_or_else(overflow)?;
        Ok(internal(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gb_month_uses_hours_of_the_month() {
        let feb: YearMonth = "2026-02".parse().unwrap();
        let mar: YearMonth = "2026-03".parse().unwrap();
        let c = Conversion::find("byte-seconds", "GB-month").unwrap();
        let gib_month = |m: YearMonth| i128::from(GIB) * 3600 * i128::from(m.hours());
        assert_eq!(c.to_pricing(gib_month(feb), feb).unwrap(), Decimal::ONE);
        assert_eq!(c.to_pricing(gib_month(mar), mar).unwrap(), Decimal::ONE);
        assert_eq!(Conversion::find("seconds", "hours").unwrap().to_pricing(5400, feb).unwrap(), Decimal::new(15, 1));
        assert_eq!(Conversion::find("milliseconds", "hours"), None);
        // Host metering: 1.5 vCPU-hours and 2 GB-hours.
        let cpu = Conversion::find("milliseconds", "vCPU-hours").unwrap();
        assert_eq!(cpu.to_pricing(5_400_000, feb).unwrap(), Decimal::new(15, 1));
        let mem = Conversion::find("byte-seconds", "GB-hours").unwrap();
        assert_eq!(mem.to_pricing(2 * (1 << 30) * 3600, feb).unwrap(), Decimal::from(2));
        assert_eq!(Conversion::find("seconds", "GB"), None);
        assert!(Conversion::Identity.to_pricing(i128::MAX, feb).is_err());
    }
}
