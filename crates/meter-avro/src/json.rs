//! Any record as JSON, whatever its framing and writer schema: what `meter
//! tail` prints. The record is decoded generically (`apache-avro`) with its
//! writer schema and resolved to the current one; values are rendered the
//! way the interoperability tools in `tests/interop/` print them: longs as
//! numbers, decimals as decimal strings at their scale, bytes as base64,
//! enums as their symbol, unions as the branch's value.

use apache_avro::types::Value;
use apache_avro::Schema;

use crate::{Body, DecodeError, Framed};

/// `payload`, a record of `framed`'s schema, as JSON.
pub fn to_json(framed: &Framed, payload: &[u8]) -> Result<serde_json::Value, DecodeError> {
    let current = Schema::parse_str(framed.avsc()).map_err(|e| DecodeError::Unresolvable(e.to_string()))?;
    let (writer, body) = match framed.read(payload)?.0 {
        Body::Current(body) => (None, body),
        Body::Other(w, _, body) => (Some(w), body),
    };
    let value = match &writer {
        None => crate::decode_generic(&current, body)?,
        Some(w) => crate::decode_generic(w, body)?.resolve(&current).map_err(|e| DecodeError::Unresolvable(e.to_string()))?,
    };
    Ok(json(value, Some(&current)))
}

/// `v` as JSON; `schema` (the reader schema of `v`) gives decimals their
/// scale.
fn json(v: Value, schema: Option<&Schema>) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::Null => J::Null,
        Value::Boolean(b) => J::Bool(b),
        Value::Int(n) | Value::Date(n) | Value::TimeMillis(n) => J::from(n),
        Value::Long(n)
        | Value::TimeMicros(n)
        | Value::TimestampMillis(n)
        | Value::TimestampMicros(n)
        | Value::TimestampNanos(n)
        | Value::LocalTimestampMillis(n)
        | Value::LocalTimestampMicros(n)
        | Value::LocalTimestampNanos(n) => J::from(n),
        Value::Float(f) => J::from(f64::from(f)),
        Value::Double(f) => J::from(f),
        Value::Bytes(b) | Value::Fixed(_, b) => J::String(base64(&b)),
        Value::String(s) | Value::Enum(_, s) => J::String(s),
        Value::Union(i, inner) => {
            let branch = match schema {
                Some(Schema::Union(u)) => u.variants().get(i as usize),
                _ => None,
            };
            json(*inner, branch)
        }
        Value::Array(items) => {
            let item = match schema {
                Some(Schema::Array(a)) => Some(a.items.as_ref()),
                _ => None,
            };
            J::Array(items.into_iter().map(|v| json(v, item)).collect())
        }
        Value::Map(m) => {
            let values = match schema {
                Some(Schema::Map(m)) => Some(m.types.as_ref()),
                _ => None,
            };
            J::Object(m.into_iter().map(|(k, v)| (k, json(v, values))).collect())
        }
        Value::Record(fields) => {
            let field_schema = |name: &str| match schema {
                Some(Schema::Record(r)) => r.fields.iter().find(|f| f.name == name).map(|f| &f.schema),
                _ => None,
            };
            J::Object(
                fields
                    .into_iter()
                    .map(|(k, v)| {
                        let s = field_schema(&k);
                        (k, json(v, s))
                    })
                    .collect(),
            )
        }
        Value::Decimal(d) => {
            let scale = match schema {
                Some(Schema::Decimal(d)) => d.scale as u32,
                _ => 0,
            };
            let bytes: Vec<u8> = (&d).try_into().unwrap_or_default();
            J::String(decimal_string(&bytes, scale))
        }
        other => J::String(format!("{other:?}")),
    }
}

/// A two's-complement big-endian integer as a decimal string.
fn decimal_string(bytes: &[u8], scale: u32) -> String {
    if bytes.is_empty() || bytes.len() > 16 {
        return String::new();
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0 };
    let mut be = [fill; 16];
    be[16 - bytes.len()..].copy_from_slice(bytes);
    let n = i128::from_be_bytes(be);
    if scale == 0 {
        return n.to_string();
    }
    let digits = n.unsigned_abs().to_string();
    let scale = scale as usize;
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{}{int}.{frac}", if n < 0 { "-" } else { "" })
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(&[0, 1, 2, 255]), "AAEC/w==");
        assert_eq!(decimal_string(&[0x01, 0x00], 0), "256");
        assert_eq!(decimal_string(&[0xFF], 0), "-1");
        assert_eq!(decimal_string(&[0x01, 0x5E], 2), "3.50");
        assert_eq!(decimal_string(&[0xFE, 0xA2], 2), "-3.50");
        assert_eq!(decimal_string(&[0x05], 3), "0.005");
    }
}
