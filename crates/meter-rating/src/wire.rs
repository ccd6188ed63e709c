//! The InvoiceLine codec (`schemas/avro/invoice_line.avsc`) for
//! `billing.invoice_lines`: Avro single-object encoding like the usage
//! payloads, written by hand in the same style. Decimals travel as Avro
//! `bytes` decimals: base-unit quantities with scale 0, pricing-unit
//! quantities and full amounts with scale 12, the billed amount with scale 2.
//! Values are written exactly or refused, never rounded (see
//! [`crate::decimal::mantissa`]).
//!
//! The current schema is version 2: version 1
//! (`history/invoice_line.v1.avsc`) plus `line_type`, the last field.
//! Releases before line types wrote version 1, under its specification
//! fingerprint or, before that, under the legacy one (header bytes
//! `8777022bf336c514`), and a compacted topic keeps their lines: both are
//! read, by hand as the current body less its last field, as
//! [`LineType::Usage`] (the field's default; every line was usage then). A
//! `line_type` this build does not know is an error, not usage.

use meter_avro::binary::{Reader, Writer};
use meter_avro::{
    Body, DecodeError, EarlierVersion, Framed, SchemaError, SchemaStore, INVOICE_LINE_AVSC, INVOICE_LINE_V1_AVSC, PERIOD_CLOSE_AVSC,
};

use crate::close::CloseRecord;
use crate::decimal::{self, Rounding, AMOUNT_SCALE, FULL_SCALE};
use crate::{Decimal, InvoiceLine, LineKey, LineType, TierCharge};

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
    /// Version 1 (no `line_type`).
    v1: EarlierVersion,
}

impl InvoiceLineCodec {
    /// Single-object framing, with a schema store of its own.
    pub fn new() -> Result<Self, SchemaError> {
        InvoiceLineCodec::with_store(&SchemaStore::default())
    }

    /// Writer schemas (registry ids) known to `store`, which learns both
    /// versions.
    pub fn with_store(store: &SchemaStore) -> Result<Self, SchemaError> {
        // What deployed releases wrote under the legacy fingerprint is version 1.
        let framing = Framed::with_legacy_of("InvoiceLine", INVOICE_LINE_AVSC, INVOICE_LINE_V1_AVSC, store)?;
        Ok(InvoiceLineCodec { v1: EarlierVersion::new("InvoiceLine v1", INVOICE_LINE_V1_AVSC, &framing)?, framing })
    }

    pub fn framing(&self) -> &Framed {
        &self.framing
    }

    /// The framing, to set what it writes and accepts.
    pub fn framing_mut(&mut self) -> &mut Framed {
        &mut self.framing
    }

    /// Appends the encoding of `l` (the current schema, in the framing's
    /// output) to `out`; on error `out` is left as it was.
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
        w.string(l.line_type.as_str());
        Ok(())
    }

    /// Decodes a line written with the current schema or with version 1
    /// (whatever the framing); any other writer schema is unknown.
    pub fn decode(&self, payload: &[u8]) -> Result<InvoiceLine, DecodeError> {
        match self.framing.read(payload)?.0 {
            Body::Current(body) => Self::decode_body(body, true),
            Body::Other(_, fp, body) if self.v1.wrote(fp) => Self::decode_body(body, false),
            Body::Other(_, fp, _) => Err(DecodeError::UnknownSchema(fp)),
        }
    }

    /// A body of the current schema, or of version 1 (`has_line_type`
    /// false: the same fields less the last, `line_type`, which is then its
    /// default).
    fn decode_body(body: &[u8], has_line_type: bool) -> Result<InvoiceLine, DecodeError> {
        let mut r = Reader::new(body);
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
            line_type: if has_line_type { line_type(r.str()?)? } else { LineType::Usage },
        };
        r.finish()?;
        Ok(line)
    }
}

/// A `line_type` value: one this build knows, or an error naming it.
fn line_type(s: &str) -> Result<LineType, DecodeError> {
    s.parse().map_err(|_| {
        let known = LineType::ALL.map(LineType::as_str).join(", ");
        DecodeError::Malformed(format!("line_type {s:?} is not one this build knows ({known})"))
    })
}

/// Encoder and decoder of period-close records
/// (`schemas/avro/period_close.avsc`, on `billing.period_close`).
#[derive(Debug, Clone)]
pub struct CloseRecordCodec {
    framing: Framed,
}

impl CloseRecordCodec {
    pub fn new() -> Result<Self, SchemaError> {
        Ok(CloseRecordCodec { framing: Framed::new("PeriodClose", PERIOD_CLOSE_AVSC, &SchemaStore::default())? })
    }

    pub fn framing_mut(&mut self) -> &mut Framed {
        &mut self.framing
    }

    /// The record's key on the topic: `<month>/<customer_id>`.
    pub fn key(r: &CloseRecord) -> String {
        format!("{}/{}", r.month, r.customer_id)
    }

    pub fn encode(&self, r: &CloseRecord, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        let start = out.len();
        let result = self.write(r, out);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn write(&self, r: &CloseRecord, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.framing.write_header(out);
        let mut w = Writer(out);
        w.string(&r.month.to_string());
        w.string(&r.customer_id);
        w.string(&r.version_id);
        w.string(&r.invoice_id);
        w.string(&r.currency);
        w.long(r.line_count as i64);
        w.decimal(mantissa("total", r.total, AMOUNT_SCALE)?);
        w.string(&r.checksum);
        if !r.lines.is_empty() {
            w.long(r.lines.len() as i64);
            for (id, t, amount) in &r.lines {
                w.string(id);
                w.string(t.as_str());
                w.decimal(mantissa("lines.amount", *amount, AMOUNT_SCALE)?);
            }
        }
        w.long(0);
        w.long(r.closed_at_ms);
        Ok(())
    }

    pub fn decode(&self, payload: &[u8]) -> Result<CloseRecord, DecodeError> {
        let mut r = Reader::new(self.framing.current_body(payload)?);
        let month_s = r.string()?;
        let month = month_s.parse().map_err(|e| DecodeError::Malformed(format!("month {month_s:?}: {e}")))?;
        let customer_id = r.string()?;
        let version_id = r.string()?;
        let invoice_id = r.string()?;
        let currency = r.string()?;
        let line_count = usize::try_from(r.long()?).map_err(|_| DecodeError::Malformed("negative line_count".into()))?;
        let total = decimal("total", r.decimal()?, AMOUNT_SCALE)?;
        let checksum = r.string()?;
        let mut lines = Vec::new();
        loop {
            let mut count = r.long()?;
            if count == 0 {
                break;
            }
            if count < 0 {
                count = count.checked_neg().ok_or_else(|| DecodeError::Malformed("lines: block count overflows".into()))?;
                r.long()?;
            }
            if count > r.remaining() as i64 {
                return Err(DecodeError::Malformed("truncated: lines block count runs past the end".into()));
            }
            for _ in 0..count {
                let id = r.string()?;
                let t = line_type(r.str()?)?;
                lines.push((id, t, decimal("lines.amount", r.decimal()?, AMOUNT_SCALE)?));
            }
        }
        let closed_at_ms = r.long()?;
        r.finish()?;
        Ok(CloseRecord { month, customer_id, version_id, invoice_id, currency, line_count, total, checksum, lines, closed_at_ms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::types::Value;
    use apache_avro::Schema;
    use meter_avro::testing::{apache_round_trip, field};
    use meter_avro::{canonical, framing};

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
            assert_eq!(field(&value, "line_type"), &Value::String(l.line_type.as_str().into()), "{}", l.key);
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
        // Another InvoiceLine version known to the store has no way to be read.
        let v3 = INVOICE_LINE_AVSC.replacen(r#"{"name": "line_type""#, r#"{"name": "note", "type": "string"}, {"name": "line_type""#, 1);
        let fp = codec.framing().store().add_schema(&v3).unwrap();
        let mut other = vec![0xC3, 0x01];
        other.extend_from_slice(&fp.to_le_bytes());
        other.extend_from_slice(&good[10..]);
        assert_eq!(codec.decode(&other), Err(DecodeError::UnknownSchema(fp)));
    }

    /// Single-object `fp` header, then `body`.
    fn single_object(fp: u64, body: &[u8]) -> Vec<u8> {
        let mut payload = vec![0xC3, 0x01];
        payload.extend_from_slice(&fp.to_le_bytes());
        payload.extend_from_slice(body);
        payload
    }

    /// The golden lines (all usage), each with its body as apache-avro
    /// writes it with version 1: the value of the current record less
    /// `line_type`.
    fn version_1_lines() -> Vec<(InvoiceLine, Vec<u8>)> {
        let codec = InvoiceLineCodec::new().unwrap();
        let v1 = Schema::parse_str(INVOICE_LINE_V1_AVSC).unwrap();
        golden_lines()
            .into_iter()
            .map(|l| {
                assert_eq!(l.line_type, LineType::Usage);
                let mut current = Vec::new();
                codec.encode(&l, &mut current).unwrap();
                let (value, _) = apache_round_trip(INVOICE_LINE_AVSC, &current);
                let Value::Record(mut fields) = value else { panic!("not a record") };
                assert_eq!(fields.pop().map(|(name, _)| name).as_deref(), Some("line_type"));
                let body = apache_avro::to_avro_datum(&v1, Value::Record(fields)).unwrap();
                // Version 1's body is the current one less its last field.
                assert_eq!([body.as_slice(), b"\x0aUsage"].concat(), current[10..], "{}", l.key);
                (l, body)
            })
            .collect()
    }

    #[test]
    fn version_1_lines_from_apache_avro_read_as_usage() {
        let codec = InvoiceLineCodec::new().unwrap();
        let fp = canonical::fingerprint(INVOICE_LINE_V1_AVSC).unwrap();
        for (l, body) in version_1_lines() {
            let payload = single_object(fp, &body);
            assert_eq!(codec.decode(&payload).unwrap(), l);
            // Cut short, or with a line_type after it: malformed.
            assert!(matches!(codec.decode(&payload[..payload.len() - 1]), Err(DecodeError::Malformed(_))));
            let mut longer = payload.clone();
            Writer(&mut longer).string("Usage");
            assert!(matches!(codec.decode(&longer), Err(DecodeError::Malformed(_))), "{}", l.key);
        }
        // And a current body under version 1's header has bytes left over.
        let mut good = Vec::new();
        codec.encode(&golden_lines()[0], &mut good).unwrap();
        assert!(matches!(codec.decode(&single_object(fp, &good[10..])), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn version_1_lines_under_the_legacy_fingerprint_read_unless_switched_off() {
        let mut codec = InvoiceLineCodec::new().unwrap();
        let legacy = framing::legacy_fingerprint("InvoiceLine", INVOICE_LINE_V1_AVSC).unwrap();
        assert_eq!(legacy.to_le_bytes(), [0x87, 0x77, 0x02, 0x2b, 0xf3, 0x36, 0xc5, 0x14]);
        assert_eq!(codec.framing().legacy_fingerprint(), legacy);
        let lines = version_1_lines();
        for (l, body) in &lines {
            assert_eq!(codec.decode(&single_object(legacy, body)).unwrap(), *l);
        }
        codec.framing_mut().set_accept_legacy(false);
        assert_eq!(codec.decode(&single_object(legacy, &lines[0].1)), Err(DecodeError::LegacyFingerprint(legacy)));
    }

    #[test]
    fn registry_ids_of_either_version_are_read() {
        let codec = InvoiceLineCodec::new().unwrap();
        codec.framing().store().add_id(1, Some(INVOICE_LINE_V1_AVSC)).unwrap();
        codec.framing().store().add_id(2, Some(INVOICE_LINE_AVSC)).unwrap();
        let (l, body) = version_1_lines().remove(0);
        let confluent = |id: u32, body: &[u8]| [&[0][..], &id.to_be_bytes(), body].concat();
        assert_eq!(codec.decode(&confluent(1, &body)).unwrap(), l);
        let mut current = Vec::new();
        codec.encode(&l, &mut current).unwrap();
        assert_eq!(codec.decode(&confluent(2, &current[10..])).unwrap(), l);
    }

    /// The specification's fingerprint leaves logical types out: a schema
    /// the store knew first under version 1's fingerprint, with another
    /// decimal scale, is not taken for version 1 (its amounts would be
    /// misread), whichever fingerprint a record carries.
    #[test]
    fn a_schema_that_only_shares_version_1s_fingerprint_is_not_read_as_it() {
        let scale = r#"{"name": "amount", "type": {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 2}"#;
        assert_eq!(INVOICE_LINE_V1_AVSC.matches(scale).count(), 1);
        let other = INVOICE_LINE_V1_AVSC.replace(scale, &scale.replace("\"scale\": 2", "\"scale\": 4"));
        let fp = canonical::fingerprint(INVOICE_LINE_V1_AVSC).unwrap();
        assert_eq!(canonical::fingerprint(&other).unwrap(), fp);
        let store = SchemaStore::default();
        store.add_schema(&other).unwrap();
        let codec = InvoiceLineCodec::with_store(&store).unwrap();
        let (l, body) = version_1_lines().remove(0);
        assert_eq!(codec.decode(&single_object(fp, &body)), Err(DecodeError::UnknownSchema(fp)));
        let legacy = codec.framing().legacy_fingerprint();
        assert_eq!(codec.decode(&single_object(legacy, &body)), Err(DecodeError::UnknownSchema(legacy)));
        // The current schema is still read; a store that knew version 1 first reads it.
        let mut current = Vec::new();
        codec.encode(&l, &mut current).unwrap();
        assert_eq!(codec.decode(&current).unwrap(), l);
        assert_eq!(InvoiceLineCodec::new().unwrap().decode(&single_object(fp, &body)).unwrap(), l);
    }

    #[test]
    fn every_line_type_round_trips_and_an_unknown_one_is_refused() {
        let codec = InvoiceLineCodec::new().unwrap();
        let base = golden_lines().remove(0);
        let d = |s: &str| -> Decimal { s.parse().unwrap() };
        let charge = |line_type, service: &str, usage_type: &str, amount: &str| InvoiceLine {
            line_type,
            key: LineKey { service: service.into(), usage_type: usage_type.into(), ..base.key.clone() },
            usage_quantity: 0,
            minimum_uplift: 0,
            pricing_unit: String::new(),
            quantity: Decimal::ZERO,
            free_allowance_used: Decimal::ZERO,
            billable_quantity: Decimal::ZERO,
            tiers: Vec::new(),
            packages: None,
            unit_rate: None,
            amount_full: d(amount),
            amount: d(amount),
            ..base.clone()
        };
        let mut lines = vec![
            base.clone(),
            charge(LineType::Fee, "support", "Fee:business-support", "100.00"),
            charge(LineType::Credit, "credits", "Credit:promo-1", "-25.50"),
        ];
        for t in &LineType::ALL[3..] {
            lines.push(charge(*t, "compute", &format!("{t}:contract-1"), "-1.25"));
        }
        assert_eq!(lines.iter().map(|l| l.line_type).collect::<Vec<_>>(), LineType::ALL);
        for l in &lines {
            let mut buf = Vec::new();
            codec.encode(l, &mut buf).unwrap();
            let (value, again) = apache_round_trip(INVOICE_LINE_AVSC, &buf);
            assert_eq!(again, buf);
            assert_eq!(field(&value, "line_type"), &Value::String(l.line_type.as_str().into()));
            assert_eq!(codec.decode(&buf).unwrap(), *l);
        }
        // A value a newer release may write (a valid record for apache-avro) is an error, never usage.
        let mut good = Vec::new();
        codec.encode(&base, &mut good).unwrap();
        for unknown in ["Rebate", "", "usage"] {
            let mut buf = good[..good.len() - 1 - "Usage".len()].to_vec();
            Writer(&mut buf).string(unknown);
            let (value, _) = apache_round_trip(INVOICE_LINE_AVSC, &buf);
            assert_eq!(field(&value, "line_type"), &Value::String(unknown.into()));
            let err = codec.decode(&buf).unwrap_err();
            let DecodeError::Malformed(why) = &err else { panic!("{err:?}") };
            assert!(why.starts_with(&format!("line_type {unknown:?} is not one this build knows (Usage, Fee, Credit, ")), "{why}");
            assert_eq!(err.reason(), meter_model::DeadLetterReason::MalformedAvro);
        }
    }

    #[test]
    fn close_records_are_the_bytes_apache_avro_writes_and_read_back() {
        use crate::close::{checksum, CloseRecord};
        let lines = vec![
            ("a1".to_owned(), LineType::Usage, "124.94".parse().unwrap_or_default()),
            ("b2".to_owned(), LineType::Credit, "-28.94".parse().unwrap_or_default()),
        ];
        let r = CloseRecord {
            month: "2026-05".parse().unwrap_or_else(|_| unreachable!()),
            customer_id: "hooli".into(),
            version_id: "2026-04".into(),
            invoice_id: "inv".into(),
            currency: "USD".into(),
            line_count: 2,
            total: "96.00".parse().unwrap_or_default(),
            checksum: checksum(&lines),
            lines,
            closed_at_ms: 1_785_000_000_000,
        };
        let codec = CloseRecordCodec::new().unwrap_or_else(|e| panic!("{e}"));
        let mut buf = Vec::new();
        codec.encode(&r, &mut buf).unwrap_or_else(|e| panic!("{e}"));
        let (value, again) = apache_round_trip(PERIOD_CLOSE_AVSC, &buf);
        assert_eq!(again, buf, "apache-avro writes the same bytes");
        assert_eq!(field(&value, "checksum"), &Value::String(r.checksum.clone()));
        assert_eq!(codec.decode(&buf).unwrap_or_else(|e| panic!("{e}")), r);
        assert_eq!(CloseRecordCodec::key(&r), "2026-05/hooli");
    }
}
