//! The InvoiceLine codec (`schemas/avro/invoice_line.avsc`), same framing
//! and hand-written style as the usage codecs. Decimals travel as Avro
//! `bytes` decimals: base-unit quantities with scale 0, pricing-unit
//! quantities and full amounts with scale 12, the billed amount with scale 2.

use meter_rating::{Decimal, InvoiceLine, LineKey, TierCharge};

use crate::binary::{Reader, Writer};
use crate::{Codec, DecodeError};

/// Scale of quantities in pricing units and of full amounts.
pub const FULL_SCALE: u32 = 12;
/// Scale of the billed amount.
pub const AMOUNT_SCALE: u32 = 2;

/// A line that cannot be written with the schema's scales (ours: rating
/// keeps 12 places and rounds billed amounts to the minor unit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    #[error("{field}: {value} does not fit scale {scale}")]
    Scale { field: &'static str, value: String, scale: u32 },
}

fn mantissa(field: &'static str, d: Decimal, scale: u32) -> Result<i128, EncodeError> {
    let mut r = d;
    r.rescale(scale);
    if r != d || r.scale() != scale {
        return Err(EncodeError::Scale { field, value: d.to_string(), scale });
    }
    Ok(r.mantissa())
}

fn decimal(field: &str, m: i128, scale: u32) -> Result<Decimal, DecodeError> {
    Decimal::try_from_i128_with_scale(m, scale).map_err(|e| DecodeError::Malformed(format!("{field}: {e}")))
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

impl Codec {
    /// Appends the single-object encoding of `l` to `out`; on error `out` is
    /// left as it was.
    pub fn encode_invoice_line(&self, l: &InvoiceLine, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let r = self.write_invoice_line(l, out);
        if r.is_err() {
            out.truncate(start);
        }
        r
    }

    fn write_invoice_line(&self, l: &InvoiceLine, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        out.extend_from_slice(&self.invoice_line_header);
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

    pub fn decode_invoice_line(&self, payload: &[u8]) -> Result<InvoiceLine, DecodeError> {
        let mut r = Reader::new(self.body(&self.invoice_line_header, payload)?);
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
