//! Decimal helpers: reading decimals from TOML without passing through
//! binary floating point, the fixed internal scale, and the one conversion
//! between money and the fixed-scale integers that ClickHouse columns and
//! Avro decimals store ([`mantissa`], [`from_mantissa`]).

use std::fmt;

use rust_decimal::{Decimal, RoundingStrategy};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Decimal places kept for quantities in pricing units and for amounts
/// before invoice rounding (10^-12 of a currency unit, ten orders of
/// magnitude below a cent).
///
/// Why a fixed scale rather than "whatever the division produced": a value
/// with 28 significant digits at an arbitrary scale cannot always be
/// subtracted from another without rounding, so daily differences would not
/// add up exactly to the month. At one fixed scale every sum and difference
/// below about 7.9e16 is exact, which makes the telescoping daily lines
/// (see [`crate::rate`]) sum to the monthly amount with no residue.
pub const INTERNAL_SCALE: u32 = 12;

/// Scale of quantities in pricing units and of full amounts, as stored
/// (ClickHouse `Decimal(38, 12)`, Avro decimals of scale 12): [`INTERNAL_SCALE`].
pub const FULL_SCALE: u32 = INTERNAL_SCALE;
/// Scale of billed amounts (ClickHouse `Decimal(38, 2)`, Avro scale 2).
pub const AMOUNT_SCALE: u32 = 2;

/// How [`mantissa`] treats a value with more decimal places than the scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// Refuse it: for values rating has already rounded (amounts, and
    /// everything sent to billing consumers), where more places mean a bug.
    Exact,
    /// Round half to even: for derived rates shown to analysts (a package
    /// price / size can have more places than a column holds).
    HalfEven,
}

/// A value that does not fit a scale.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value} does not fit {scale} decimal places")]
pub struct ScaleError {
    pub value: String,
    pub scale: u32,
}

/// `d` as the mantissa of a decimal with exactly `scale` places.
pub fn mantissa(d: Decimal, scale: u32, rounding: Rounding) -> Result<i128, ScaleError> {
    let rounded = d.round_dp_with_strategy(scale, RoundingStrategy::MidpointNearestEven);
    let mut r = rounded;
    // Rescaling fails to reach `scale` when the digits would exceed 28.
    r.rescale(scale);
    if (rounding == Rounding::Exact && rounded != d) || r != rounded || r.scale() != scale {
        return Err(ScaleError { value: d.to_string(), scale });
    }
    Ok(r.mantissa())
}

/// The decimal whose mantissa at `scale` places is `m`.
pub fn from_mantissa(m: i128, scale: u32) -> Result<Decimal, ScaleError> {
    Decimal::try_from_i128_with_scale(m, scale).map_err(|_| ScaleError { value: format!("{m}e-{scale}"), scale })
}

/// Round to [`INTERNAL_SCALE`], half to even.
pub fn internal(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(INTERNAL_SCALE, RoundingStrategy::MidpointNearestEven)
}

/// Round to the currency's minor unit, half to even (banker's rounding),
/// and show exactly that many places ("57.00", not "57").
pub fn to_minor_unit(d: Decimal, digits: u32) -> crate::Result<Decimal> {
    let mut r = d.round_dp_with_strategy(digits, RoundingStrategy::MidpointNearestEven);
    r.rescale(digits);
    if r != d.round_dp_with_strategy(digits, RoundingStrategy::MidpointNearestEven) {
        return Err(crate::Error::Overflow { context: format!("amount {d}") });
    }
    Ok(r)
}

/// A decimal written in TOML as a string (`"0.0104"`) or an integer (`51200`).
/// Floats are refused: `0.0104` written bare would be read as an IEEE double
/// first, and a price must never have been a binary fraction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dec(pub Decimal);

impl<'de> Deserialize<'de> for Dec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal as a string (e.g. \"0.0104\") or an integer")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dec, E> {
                // Exact: more digits than a Decimal holds is an error, not a silent rounding.
                Decimal::from_str_exact(s.trim()).map(Dec).map_err(|e| E::custom(format!("{s:?} is not a decimal: {e}")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Dec, E> {
                Ok(Dec(Decimal::from(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Dec, E> {
                Ok(Dec(Decimal::from(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Dec, E> {
                Err(E::custom(format!(
                    "{v} is a float; write decimals as strings (\"{v}\") so they are never rounded through binary floating point"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mantissas_are_exact_or_rounded_as_asked() {
        let d: Decimal = "1402.88".parse().unwrap_or_default();
        assert_eq!(mantissa(d, 12, Rounding::Exact), Ok(1_402_880_000_000_000));
        assert_eq!(from_mantissa(1_402_880_000_000_000, 12), Ok(d));
        assert_eq!(mantissa("3.48".parse().unwrap_or_default(), 2, Rounding::Exact), Ok(348));
        let third = Decimal::ONE / Decimal::from(3);
        assert!(mantissa(third, 12, Rounding::Exact).is_err());
        assert_eq!(mantissa(third, 12, Rounding::HalfEven), Ok(333_333_333_333));
        assert_eq!(mantissa("1.005".parse().unwrap_or_default(), 2, Rounding::HalfEven), Ok(100));
        assert!(mantissa("1.005".parse().unwrap_or_default(), 2, Rounding::Exact).is_err());
    }
}
