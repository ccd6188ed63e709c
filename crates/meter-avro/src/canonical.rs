//! The Parsing Canonical Form of a schema and its CRC-64-AVRO fingerprint,
//! exactly as the Avro specification defines them ("Parsing Canonical Form
//! for Schemas", "Schema Fingerprints"): the value Java's
//! `SchemaNormalization.parsingFingerprint64` and fastavro compute, which
//! the single-object header carries little-endian.
//!
//! Written here from the specification rather than taken from
//! `apache-avro`, whose canonical form keeps attributes the specification
//! strips (`logicalType`, `precision`, `scale`, ...): its fingerprint of a
//! schema with a logical type is not the one other implementations compute.
//! The tests pin the fingerprints of every schema in `schemas/avro/` to the
//! values Java and fastavro print (`tests/interop/`).
//!
//! The transformations, in the specification's words:
//! - [PRIMITIVES] `{"type":"int"}` becomes `"int"`;
//! - [FULLNAMES] names become fullnames, with the namespace they inherit;
//! - [STRIP] only `type`, `name`, `fields`, `symbols`, `items`, `values`
//!   and `size` are kept (no `doc`, `aliases`, `default`, `logicalType`,
//!   `order`, `namespace`, ...);
//! - [ORDER] in that order;
//! - [STRINGS], [INTEGERS], [WHITESPACE]: minimal JSON, strings with no
//!   escapes beyond what JSON requires, integers without quotes or leading
//!   zeros.
//!
//! A named type defined before is written as its fullname.

use std::collections::HashSet;

use serde_json::{Map, Value};

const PRIMITIVES: [&str; 8] = ["null", "boolean", "int", "long", "float", "double", "bytes", "string"];

/// A schema that is not valid JSON or not a valid Avro schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Avro schema: {0}")]
pub struct CanonicalError(String);

fn err<T>(msg: impl Into<String>) -> Result<T, CanonicalError> {
    Err(CanonicalError(msg.into()))
}

/// The Parsing Canonical Form of the schema written as JSON in `avsc`.
pub fn parsing_canonical_form(avsc: &str) -> Result<String, CanonicalError> {
    let schema: Value = serde_json::from_str(avsc).map_err(|e| CanonicalError(format!("not JSON: {e}")))?;
    let mut out = String::new();
    let mut defined = HashSet::new();
    write(&schema, "", &mut defined, &mut out)?;
    Ok(out)
}

/// CRC-64-AVRO (the specification's Rabin fingerprint) of `bytes`.
pub fn crc64_avro(bytes: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u64; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut fp = i as u64;
            for _ in 0..8 {
                fp = (fp >> 1) ^ (EMPTY & (fp & 1).wrapping_neg());
            }
            *slot = fp;
        }
        t
    });
    let mut fp = EMPTY;
    for &b in bytes {
        fp = (fp >> 8) ^ table[((fp ^ u64::from(b)) & 0xff) as usize];
    }
    fp
}

/// The fingerprint of the schema in `avsc`, as the specification defines
/// it: CRC-64-AVRO of its Parsing Canonical Form.
pub fn fingerprint(avsc: &str) -> Result<u64, CanonicalError> {
    Ok(crc64_avro(parsing_canonical_form(avsc)?.as_bytes()))
}

fn string(s: &str, out: &mut String) {
    // serde_json escapes only what JSON requires (quote, backslash, control
    // characters) and writes everything else as UTF-8: [STRINGS].
    out.push_str(&Value::String(s.to_owned()).to_string());
}

/// The fullname of a named type: `name` if it holds a dot, else the
/// schema's `namespace` (or the enclosing one) joined to it.
fn fullname(m: &Map<String, Value>, enclosing: &str) -> Result<(String, String), CanonicalError> {
    let Some(Value::String(name)) = m.get("name") else { return err("a named type without a string name") };
    if name.contains('.') {
        let ns = name.rsplit_once('.').map_or("", |(ns, _)| ns).to_owned();
        return Ok((name.clone(), ns));
    }
    let ns = match m.get("namespace") {
        Some(Value::String(ns)) => ns.clone(),
        Some(Value::Null) | None => enclosing.to_owned(),
        Some(_) => return err(format!("namespace of {name} is not a string")),
    };
    Ok((if ns.is_empty() { name.clone() } else { format!("{ns}.{name}") }, ns))
}

/// A type reference by name: primitives as they are, others as fullnames.
fn reference(name: &str, enclosing: &str) -> String {
    if PRIMITIVES.contains(&name) || name.contains('.') || enclosing.is_empty() {
        name.to_owned()
    } else {
        format!("{enclosing}.{name}")
    }
}

fn write(schema: &Value, enclosing: &str, defined: &mut HashSet<String>, out: &mut String) -> Result<(), CanonicalError> {
    match schema {
        Value::String(name) => string(&reference(name, enclosing), out),
        Value::Array(branches) => {
            out.push('[');
            for (i, b) in branches.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(b, enclosing, defined, out)?;
            }
            out.push(']');
        }
        Value::Object(m) => {
            let Some(Value::String(kind)) = m.get("type") else { return err("a schema object without a string type") };
            match kind.as_str() {
                k if PRIMITIVES.contains(&k) => string(k, out),
                "record" | "error" | "enum" | "fixed" => {
                    let (name, ns) = fullname(m, enclosing)?;
                    if !defined.insert(name.clone()) {
                        return err(format!("{name} is defined twice"));
                    }
                    out.push_str("{\"name\":");
                    string(&name, out);
                    out.push_str(",\"type\":");
                    string(if kind == "error" { "record" } else { kind }, out);
                    match kind.as_str() {
                        "record" | "error" => {
                            let Some(Value::Array(fields)) = m.get("fields") else { return err(format!("record {name} has no fields")) };
                            out.push_str(",\"fields\":[");
                            for (i, f) in fields.iter().enumerate() {
                                let Value::Object(f) = f else { return err(format!("a field of {name} is not an object")) };
                                let (Some(Value::String(fname)), Some(ftype)) = (f.get("name"), f.get("type")) else {
                                    return err(format!("a field of {name} lacks a name or a type"));
                                };
                                if i > 0 {
                                    out.push(',');
                                }
                                out.push_str("{\"name\":");
                                string(fname, out);
                                out.push_str(",\"type\":");
                                write(ftype, &ns, defined, out)?;
                                out.push('}');
                            }
                            out.push(']');
                        }
                        "enum" => {
                            let Some(Value::Array(symbols)) = m.get("symbols") else { return err(format!("enum {name} has no symbols")) };
                            out.push_str(",\"symbols\":[");
                            for (i, s) in symbols.iter().enumerate() {
                                let Value::String(s) = s else { return err(format!("a symbol of {name} is not a string")) };
                                if i > 0 {
                                    out.push(',');
                                }
                                string(s, out);
                            }
                            out.push(']');
                        }
                        _ => {
                            let Some(size) = m.get("size").and_then(size) else { return err(format!("fixed {name} has no size")) };
                            out.push_str(&format!(",\"size\":{size}"));
                        }
                    }
                    out.push('}');
                }
                "array" => {
                    let Some(items) = m.get("items") else { return err("an array without items") };
                    out.push_str("{\"type\":\"array\",\"items\":");
                    write(items, enclosing, defined, out)?;
                    out.push('}');
                }
                "map" => {
                    let Some(values) = m.get("values") else { return err("a map without values") };
                    out.push_str("{\"type\":\"map\",\"values\":");
                    write(values, enclosing, defined, out)?;
                    out.push('}');
                }
                // A type object naming another type ({"type": "Foo"}).
                other => string(&reference(other, enclosing), out),
            }
        }
        other => return err(format!("{other} is not a schema")),
    }
    Ok(())
}

/// A fixed's size: a JSON integer, or one written as a string ([INTEGERS]).
fn size(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specification_examples_and_crc64_reference_values() {
        // The empty-input fingerprint of the specification's algorithm.
        assert_eq!(crc64_avro(b""), 0xc15d_213a_a4d7_a795);
        assert_eq!(parsing_canonical_form(r#"{"type": "int"}"#).unwrap(), r#""int""#);
        assert_eq!(parsing_canonical_form(r#""long""#).unwrap(), r#""long""#);
        assert_eq!(
            parsing_canonical_form(r#"{"type":"long","logicalType":"timestamp-millis"}"#).unwrap(),
            r#""long""#,
            "logical types are not part of the canonical form"
        );
        let rec = r#"{"type":"record","namespace":"a.b","name":"R","doc":"x","aliases":["Q"],
            "fields":[{"name":"f","type":{"type":"enum","name":"E","symbols":["X","Y"]},"default":"X","doc":"d"},
                      {"name":"g","type":"E"},{"name":"h","type":{"type":"fixed","name":"c.F","size":"016"}},
                      {"name":"m","type":{"type":"map","values":{"type":"array","items":"F2"}}}]}"#;
        let rec = rec.replace("F2", "c.F");
        assert_eq!(
            parsing_canonical_form(&rec).unwrap(),
            r#"{"name":"a.b.R","type":"record","fields":[{"name":"f","type":{"name":"a.b.E","type":"enum","symbols":["X","Y"]}},{"name":"g","type":"a.b.E"},{"name":"h","type":{"name":"c.F","type":"fixed","size":16}},{"name":"m","type":{"type":"map","values":{"type":"array","items":"c.F"}}}]}"#
        );
        // Java's SchemaNormalization.parsingFingerprint64 of "int".
        assert_eq!(fingerprint(r#""int""#).unwrap() as i64, 8247732601305521295);
    }

    #[test]
    fn invalid_schemas_are_errors_not_panics() {
        for bad in ["", "{", "{}", r#"{"type": 5}"#, r#"{"type":"record","name":"R"}"#, r#"{"type":"enum","name":"E"}"#, "7"] {
            assert!(parsing_canonical_form(bad).is_err(), "{bad}");
        }
    }
}
