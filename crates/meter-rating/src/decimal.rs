//! Decimal helpers: reading decimals from TOML without passing through
//! binary floating point, and the fixed internal scale.

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
