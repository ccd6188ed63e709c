//! The InvoiceLine codec (`schemas/avro/invoice_line.avsc`) for
//! `billing.invoice_lines`: Avro single-object encoding like the usage
//! payloads, written by hand in the same style. Decimals travel as Avro
//! `bytes` decimals: base-unit quantities with scale 0, pricing-unit
//! quantities and full amounts with scale 12, the billed amount with scale 2.
//! Values are written exactly or refused, never rounded (see
//! [`crate::decimal::mantissa`]).

use meter_avro::binary::{Reader, Writer};
use meter_avro::{DecodeError, Framed, SchemaError, SchemaStore, INVOICE_LINE_AVSC};

use crate::decimal::{self, Rounding, AMOUNT_SCALE, FULL_SCALE};
use crate::{Decimal, InvoiceLine, LineKey, TierCharge};

/// A line that cannot be written with the schema's scales (ours: rating
/// keeps 12 places and rounds billed amounts to the minor unit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("{field}: {value} does not fit scale {scale}")]
    Scale { field: &'static str, value: String, scale: u32 },
}

fn mantissa(field: &'static str, d: Decimal, scale: u32) -> Result<i128, EncodeError> {
    decimal::mantissa(d, scale, Rounding::Exact).map_err(|_| EncodeError::Scale { field, value: d.to_string(), scale })
}

fn decimal(field: &str, m: i128, scale: u32) -> Result<Decimal, DecodeError> {
    decimal::from_mantissa(m, scale).map_err(|e| DecodeError::Malformed(format!("{field}: {e}")))
}

fn optional(w: &mut Writer<'_>, field: &'static str, d: Option<Decimal>) -> Result<(), EncodeError> {
    match d {
        None => w.long(0),
        Some(d) => {
            w.long(1);
            w.decimal(mantissa(field, d, FULL_SCALE)?);
        }
    }
    Ok(())
}

fn read_optional(r: &mut Reader<'_>, field: &str) -> Result<Option<Decimal>, DecodeError> {
    match r.long()? {
        0 => Ok(None),
        1 => Ok(Some(decimal(field, r.decimal()?, FULL_SCALE)?)),
        b => Err(DecodeError::Malformed(format!("{field}: union branch {b} out of range"))),
    }
}

/// Encoder and decoder of invoice lines. Cheap to clone.
#[derive(Debug, Clone)]
pub struct InvoiceLineCodec {
    framing: Framed,
}

impl InvoiceLineCodec {
    /// Single-object framing, with a schema store of its own.
    pub fn new() -> Result<Self, SchemaError> {
        InvoiceLineCodec::with_store(&SchemaStore::default())
    }

    /// Writer schemas (registry ids) known to `store`.
    pub fn with_store(store: &SchemaStore) -> Result<Self, SchemaError> {
        Ok(InvoiceLineCodec { framing: Framed::new("InvoiceLine", INVOICE_LINE_AVSC, store)? })
    }

    pub fn framing(&self) -> &Framed {
        &self.framing
    }

    /// The framing, to set what it writes.
    pub fn framing_mut(&mut self) -> &mut Framed {
        &mut self.framing
    }

    /// Appends the single-object encoding of `l` to `out`; on error `out` is
    /// left as it was.
    pub fn encode(&self, l: &InvoiceLine, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let r = self.write(l, out);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn write(&self, l: &InvoiceLine, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.framing.write_header(out);
        let mut w = Writer(out);
        let full = |field, d| mantissa(field, d, FULL_SCALE);
        w.string(&l.line_id);
        w.string(&l.month.to_string());
        w.string(&l.version_id);
        w.string(&l.key.customer_id);
        w.string(&l.key.service);
        w.string(&l.key.usage_type);
        w.string(&l.key.region);
        w.decimal(l.usage_quantity);
        w.decimal(l.minimum_uplift);
        w.string(&l.pricing_unit);
        w.decimal(full("quantity", l.quantity)?);
        w.decimal(full("free_allowance_used", l.free_allowance_used)?);
        w.decimal(full("billable_quantity", l.billable_quantity)?);
        if !l.tiers.is_empty() {
            w.long(l.tiers.len() as i64);
            for t in &l.tiers {
                w.decimal(full("tiers.from", t.from)?);
                optional(&mut w, "tiers.up_to", t.up_to)?;
                w.decimal(full("tiers.quantity", t.quantity)?);
                w.decimal(full("tiers.unit_rate", t.unit_rate)?);
                w.decimal(full("tiers.amount", t.amount)?);
            }
        }
        w.long(0);
        optional(&mut w, "packages", l.packages)?;
        optional(&mut w, "unit_rate", l.unit_rate)?;
        w.decimal(full("amount_full", l.amount_full)?);
        w.decimal(mantissa("amount", l.amount, AMOUNT_SCALE)?);
        w.string(&l.currency);
        Ok(())
    }

    pub fn decode(&self, payload: &[u8]) -> Result<InvoiceLine, DecodeError> {
        let mut r = Reader::new(self.framing.current_body(payload)?);
        let full = |r: &mut Reader<'_>, field: &str| -> Result<Decimal, DecodeError> { decimal(field, r.decimal()?, FULL_SCALE) };
        let line_id = r.string()?;
        let month_s = r.string()?;
        let month = month_s.parse().map_err(|e| DecodeError::Malformed(format!("month {month_s:?}: {e}")))?;
        let version_id = r.string()?;
        let key = LineKey { customer_id: r.string()?, service: r.string()?, usage_type: r.string()?, region: r.string()? };
        let usage_quantity = r.decimal()?;
        let minimum_uplift = r.decimal()?;
        let pricing_unit = r.string()?;
        let quantity = full(&mut r, "quantity")?;
        let free_allowance_used = full(&mut r, "free_allowance_used")?;
        let billable_quantity = full(&mut r, "billable_quantity")?;
        let mut tiers = Vec::new();
        loop {
            let mut count = r.long()?;
            if count == 0 {
                break;
            }
            if count < 0 {
                // A negative count is followed by the block's size in bytes.
                count = count.checked_neg().ok_or_else(|| DecodeError::Malformed("tiers: block count overflows".into()))?;
                r.long()?;
            }
            if count > r.remaining() as i64 {
                return Err(DecodeError::Malformed("truncated: tiers block count runs past the end".into()));
            }
            for _ in 0..count {
                tiers.push(TierCharge {
                    from: full(&mut r, "tiers.from")?,
                    up_to: read_optional(&mut r, "tiers.up_to")?,
                    quantity: full(&mut r, "tiers.quantity")?,
                    unit_rate: full(&mut r, "tiers.unit_rate")?,
                    amount: full(&mut r, "tiers.amount")?,
                });
            }
        }
        let line = InvoiceLine {
            line_id,
            month,
            key,
            usage_quantity,
            minimum_uplift,
            pricing_unit,
            quantity,
            free_allowance_used,
            billable_quantity,
            tiers,
            packages: read_optional(&mut r, "packages")?,
            unit_rate: read_optional(&mut r, "unit_rate")?,
            amount_full: full(&mut r, "amount_full")?,
            amount: decimal("amount", r.decimal()?, AMOUNT_SCALE)?,
            version_id,
            currency: r.string()?,
        };
        r.finish()?;
        Ok(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;
    use meter_avro::testing::{apache_round_trip, field};

    fn golden_lines() -> Vec<crate::InvoiceLine> {
        use crate::{fixture::Scenario, rate_month, PriceBook, YearMonth};
        let month: YearMonth = "2026-02".parse().unwrap();
        let (days, minutes) = Scenario::golden().unwrap().usage(month).unwrap();
        rate_month(&PriceBook::sample().unwrap(), &meter_model::Catalog::builtin(), month, &days, &minutes).unwrap().lines
    }

    #[test]
    fn invoice_line_bytes_match_apache_avro() {
        let codec = InvoiceLineCodec::new().unwrap();
        let lines = golden_lines();
        // Graduated (several tiers), package, free allowance, per-unit with minimums: every shape of line.
        assert!(lines.iter().any(|l| l.tiers.len() > 1) && lines.iter().any(|l| l.packages.is_some()));
        assert!(lines.iter().any(|l| l.tiers.iter().any(|t| t.up_to.is_some())) && lines.iter().any(|l| l.unit_rate.is_none()));
        for l in &lines {
            let mut buf = Vec::new();
            codec.encode(l, &mut buf).unwrap();
            let (value, again) = apache_round_trip(INVOICE_LINE_AVSC, &buf);
            assert_eq!(again, buf, "{}", l.key);
            assert_eq!(field(&value, "line_id"), &Value::String(l.line_id.clone()));
            // apache-avro reads the billed amount as the same number of cents.
            let Value::Decimal(d) = field(&value, "amount") else { panic!("amount is not a decimal") };
            let bytes: Vec<u8> = d.try_into().unwrap();
            let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0 };
            let mut be = [fill; 16];
            be[16 - bytes.len()..].copy_from_slice(&bytes);
            let cents = crate::Decimal::from_i128_with_scale(i128::from_be_bytes(be), 2);
            assert_eq!(cents, l.amount, "{}", l.key);
            assert_eq!(codec.decode(&buf).unwrap(), *l);
        }
    }

    #[test]
    fn invoice_line_refuses_what_the_schema_cannot_hold() {
        let codec = InvoiceLineCodec::new().unwrap();
        let mut l = golden_lines().remove(0);
        l.amount = "1.005".parse().unwrap();
        let mut buf = vec![1, 2, 3];
        assert!(matches!(codec.encode(&l, &mut buf), Err(EncodeError::Scale { field: "amount", .. })));
        assert_eq!(buf, vec![1, 2, 3]);
        // Truncated and trailing input is malformed, a foreign schema is unknown.
        let good = {
            let mut b = Vec::new();
            codec.encode(&golden_lines()[0], &mut b).unwrap();
            b
        };
        assert!(matches!(codec.decode(&good[..good.len() - 1]), Err(DecodeError::Malformed(_))));
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(codec.decode(&longer), Err(DecodeError::Malformed(_))));
        let mut event = Vec::new();
        Framed::new("UsageEvent", meter_avro::USAGE_EVENT_AVSC, &SchemaStore::default()).unwrap().write_header(&mut event);
        event.extend_from_slice(&good[10..]);
        assert!(matches!(codec.decode(&event), Err(DecodeError::UnknownSchema(_))));
    }
}
