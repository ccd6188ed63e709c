use super::*;
use crate::testing::{apache_round_trip, field};
use apache_avro::types::Value;
use proptest::prelude::*;

fn sample_event() -> UsageEvent {
    let mut attributes = BTreeMap::new();
    attributes.insert("instance_type".to_owned(), "m5.large".to_owned());
    UsageEvent {
        event_id: meter_model::event_id("agent-1", "", "cust-7", 42),
        agent_id: "agent-1".into(),
        seq: Some(42),
        customer_id: "cust-7".into(),
        service: "compute".into(),
        usage_type: "BoxUsage:m5.large".into(),
        resource_id: "i-0abc".into(),
        region: "us-east-1".into(),
        quantity: 1,
        event_time: 1_764_000_000_000,
        attributes,
        incarnation: String::new(),
    }
}

fn sample_aggregate(sum: i128) -> AggregatedUsage {
    AggregatedUsage {
        key: WindowKey {
            granularity: Granularity::Hour,
            window_start: 1_764_000_000_000, // a whole hour
            customer_id: "cust-7".into(),
            service: "object-storage".into(),
            usage_type: "TimedStorage-ByteSec".into(),
            region: "eu-west-1".into(),
            resource_id: String::new(),
        },
        event_count: 3600,
        quantity_sum: sum,
        quantity_min: 0,
        quantity_max: i64::MAX,
        first_event_time: 1,
        last_event_time: 2,
        revision: 7,
        is_final: true,
        delta_sum: sum / -2,
    }
}

#[test]
fn usage_event_bytes_match_apache_avro() {
    let codec = Codec::new().unwrap();
    let e = sample_event();
    let mut buf = Vec::new();
    codec.encode_event(&e, &mut buf);
    let (value, again) = apache_round_trip(USAGE_EVENT_AVSC, &buf);
    assert_eq!(again, buf);
    assert_eq!(field(&value, "quantity"), &Value::Long(1));
    assert_eq!(field(&value, "event_time"), &Value::TimestampMillis(1_764_000_000_000));
    assert_eq!(field(&value, "seq"), &Value::Union(1, Box::new(Value::Long(42))));
    assert_eq!(codec.decode_event(&buf).unwrap(), e);
}

#[test]
fn aggregate_bytes_match_apache_avro_for_128_bit_sums() {
    let codec = Codec::new().unwrap();
    for sum in [0, 1, -1, 127, 128, -128, -129, i128::from(i64::MAX) * 1000, i128::MAX, i128::MIN] {
        let a = sample_aggregate(sum);
        let mut buf = Vec::new();
        codec.encode_aggregate(&a, &mut buf);
        let (value, again) = apache_round_trip(AGGREGATED_USAGE_AVSC, &buf);
        assert_eq!(again, buf, "sum {sum}");
        assert_eq!(field(&value, "granularity"), &Value::Enum(1, "HOUR".into()));
        let Value::Decimal(d) = field(&value, "quantity_sum") else { panic!("not a decimal") };
        let bytes: Vec<u8> = d.try_into().unwrap();
        let fill = if bytes[0] & 0x80 != 0 { 0xFF } else { 0 };
        let mut be = [fill; 16];
        be[16 - bytes.len()..].copy_from_slice(&bytes);
        assert_eq!(i128::from_be_bytes(be), sum);
        assert_eq!(codec.decode_aggregate(&buf).unwrap(), a);
    }
}

#[test]
fn dead_letter_round_trips_through_apache_avro() {
    let codec = Codec::new().unwrap();
    let d = DeadLetter {
        reason: DeadLetterReason::NegativeQuantity.as_str().into(),
        detail: "quantity -5 is negative".into(),
        source_topic: "usage.events".into(),
        source_partition: 3,
        source_offset: 99,
        key: Some(b"cust".to_vec()),
        payload: vec![0, 1, 2, 255],
        dead_lettered_at: 5,
    };
    let mut buf = Vec::new();
    codec.encode_dead_letter(&d, &mut buf);
    let (_, again) = apache_round_trip(DEAD_LETTER_AVSC, &buf);
    assert_eq!(again, buf);
    let back = codec.decode_dead_letter(&buf).unwrap();
    assert_eq!(back.reason, "negative_quantity");
    assert_eq!(back, d);
}

#[test]
fn bad_payloads_get_their_own_errors() {
    let codec = Codec::new().unwrap();
    let mut good = Vec::new();
    codec.encode_event(&sample_event(), &mut good);
    assert_eq!(codec.decode_event(&[]), Err(DecodeError::Empty));
    assert_eq!(codec.decode_event(b"{\"json\": true}"), Err(DecodeError::BadMagic));
    let mut other_schema = good.clone();
    other_schema[5] ^= 0xFF;
    assert!(matches!(codec.decode_event(&other_schema), Err(DecodeError::UnknownSchema(_))));
    for cut in 2..good.len() {
        assert!(codec.decode_event(&good[..cut]).is_err(), "truncated at {cut} decoded");
    }
    let mut trailing = good.clone();
    trailing.push(0);
    assert!(matches!(codec.decode_event(&trailing), Err(DecodeError::Malformed(_))));
}

proptest! {
    #[test]
    fn arbitrary_bytes_after_a_valid_header_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
        let codec = Codec::new().unwrap();
        let mut buf = Vec::new();
        codec.event.write_header(&mut buf);
        buf.extend_from_slice(&tail);
        let _ = codec.decode_event(&buf);
        // The borrowing decoder accepts and rejects exactly the same bytes.
        prop_assert_eq!(codec.decode_event_ref(&buf).map(|e| e.to_owned_event()), codec.decode_event(&buf));
        let mut buf = Vec::new();
        codec.aggregate.write_header(&mut buf);
        buf.extend_from_slice(&tail);
        let _ = codec.decode_aggregate(&buf);
    }

    #[test]
    fn events_round_trip(q in any::<i64>(), t in any::<i64>(), seq in proptest::option::of(any::<i64>()), s in "\\PC{0,20}") {
        let codec = Codec::new().unwrap();
        let e = UsageEvent { quantity: q, event_time: t, seq, resource_id: s, ..sample_event() };
        let mut buf = Vec::new();
        codec.encode_event(&e, &mut buf);
        prop_assert_eq!(codec.decode_event(&buf).unwrap(), e.clone());
        prop_assert_eq!(codec.decode_event_ref(&buf).unwrap().to_owned_event(), e);
    }

    /// Attribute maps, including ones with a key repeated in a later block:
    /// both decoders agree, and `longest` covers every encoded entry.
    #[test]
    fn borrowed_attributes_match_owned(entries in proptest::collection::vec(("[a-c]{0,3}", "\\PC{0,12}"), 0..6)) {
        let codec = Codec::new().unwrap();
        let mut buf = Vec::new();
        codec.encode_event(&UsageEvent { attributes: Default::default(), ..sample_event() }, &mut buf);
        buf.pop(); // the empty incarnation
        buf.pop(); // the empty map's terminating 0
        let mut w = binary::Writer(&mut buf);
        for (k, v) in &entries {
            w.long(1);
            w.string(k);
            w.string(v);
        }
        w.long(0);
        w.string("");
        let owned = codec.decode_event(&buf).unwrap();
        let borrowed = codec.decode_event_ref(&buf).unwrap();
        prop_assert_eq!(borrowed.to_owned_event(), owned);
        let longest = entries.iter().map(|(k, v)| k.len().max(v.len())).max().unwrap_or(0);
        prop_assert_eq!(borrowed.attributes.longest(), longest);
    }
}

#[test]
fn borrowed_decoder_rejects_bad_payloads_like_the_owned_one() {
    let codec = Codec::new().unwrap();
    let mut good = Vec::new();
    codec.encode_event(&sample_event(), &mut good);
    let mut cases: Vec<Vec<u8>> = vec![vec![], b"{\"json\": true}".to_vec()];
    let mut other_schema = good.clone();
    other_schema[5] ^= 0xFF;
    cases.push(other_schema);
    cases.extend((2..good.len()).map(|cut| good[..cut].to_vec()));
    let mut trailing = good.clone();
    trailing.push(0);
    cases.push(trailing);
    for c in cases {
        assert_eq!(codec.decode_event_ref(&c).map(|e| e.to_owned_event()), codec.decode_event(&c), "{c:?}");
        assert!(codec.decode_event_ref(&c).is_err());
    }
}

/// The specification's fingerprints, as the single-object header carries
/// them (little-endian), computed independently by Java's
/// `SchemaNormalization.parsingFingerprint64` (org.apache.avro:avro 1.12.2)
/// and fastavro 1.13.1: `tests/interop/java` and `tests/interop/python`
/// `fingerprint` print these. A changed value means a changed schema.
const SPEC_FINGERPRINTS: [(&str, &str, &str); 7] = [
    ("UsageEvent", USAGE_EVENT_AVSC, "7c0202c68fa08a40"),
    ("UsageEvent v1", USAGE_EVENT_V1_AVSC, "ef4a872171edd5d3"),
    ("AggregatedUsage", AGGREGATED_USAGE_AVSC, "ce627383ae9f9048"),
    ("DeadLetter", DEAD_LETTER_AVSC, "12fc328c31d77841"),
    ("InvoiceLine", INVOICE_LINE_AVSC, "76e475b44407e66c"),
    ("InvoiceLine v1", INVOICE_LINE_V1_AVSC, "655d514a5e44920c"),
    ("PeriodClose", PERIOD_CLOSE_AVSC, "1953af596976679b"),
];

/// What meterline wrote before (apache-avro's canonical form keeps logical
/// types): the fingerprints deployed agents and compacted topics carry, of
/// the schema versions of that time.
const LEGACY_FINGERPRINTS: [(&str, &str, &str); 3] = [
    ("UsageEvent", USAGE_EVENT_V1_AVSC, "a4dbce6eb06590ff"),
    ("AggregatedUsage", AGGREGATED_USAGE_AVSC, "d9d273e080c627f7"),
    ("InvoiceLine", INVOICE_LINE_V1_AVSC, "8777022bf336c514"),
];

fn hex_le(fp: u64) -> String {
    fp.to_le_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn fingerprints_are_the_specifications_as_java_and_fastavro_compute_them() {
    for (name, avsc, want) in SPEC_FINGERPRINTS {
        assert_eq!(hex_le(canonical::fingerprint(avsc).unwrap()), want, "{name}");
    }
    let codec = Codec::new().unwrap();
    let mut buf = Vec::new();
    codec.encode_event(&sample_event(), &mut buf);
    assert_eq!(buf[..2], [0xC3, 0x01]);
    assert_eq!(buf[2..10].iter().map(|b| format!("{b:02x}")).collect::<String>(), SPEC_FINGERPRINTS[0].2);
}

#[test]
fn the_legacy_fingerprint_is_read_unless_switched_off() {
    for (name, avsc, want) in LEGACY_FINGERPRINTS {
        assert_eq!(hex_le(framing::legacy_fingerprint(name, avsc).unwrap()), want, "{name}");
    }
    let mut codec = Codec::new().unwrap();
    let e = sample_event();
    // Deployed agents wrote version 1 (no incarnation) under it: the
    // current body less its empty incarnation.
    let mut legacy = vec![0xC3, 0x01];
    legacy.extend_from_slice(&framing::legacy_fingerprint("UsageEvent", USAGE_EVENT_V1_AVSC).unwrap().to_le_bytes());
    let mut current = Vec::new();
    codec.encode_event(&e, &mut current);
    legacy.extend_from_slice(&current[10..current.len() - 1]);
    assert_eq!(codec.decode_event(&legacy).unwrap(), e);
    let mut scratch = Vec::new();
    let (got, body, via) = codec.decode_event_with(&legacy, &mut scratch).unwrap();
    assert_eq!((got.to_owned_event(), body, via), (e.clone(), &current[10..], Via::LegacyFingerprint));
    codec.events_mut().set_accept_legacy(false);
    assert!(matches!(codec.decode_event(&legacy), Err(DecodeError::LegacyFingerprint(_))));
    assert_eq!(DecodeError::LegacyFingerprint(0).reason(), DeadLetterReason::UnknownSchema);
    assert_eq!(codec.decode_event(&current).unwrap(), e);
}

#[test]
fn confluent_framing_is_written_and_read_by_registry_id() {
    let mut codec = Codec::new().unwrap();
    codec.events_mut().set_output(Output::Confluent { id: 0x0102_0304 });
    let e = sample_event();
    let mut buf = Vec::new();
    codec.encode_event(&e, &mut buf);
    assert_eq!(buf[..5], [0, 1, 2, 3, 4]);
    assert_eq!(confluent_id(&buf), Some(0x0102_0304));
    // Not looked up yet, then looked up: the current schema under that id.
    assert_eq!(codec.decode_event(&buf), Err(DecodeError::UnknownSchemaId(0x0102_0304)));
    codec.store().add_id(0x0102_0304, Some(USAGE_EVENT_AVSC)).unwrap();
    let mut scratch = Vec::new();
    let (got, _, via) = codec.decode_event_with(&buf, &mut scratch).unwrap();
    assert_eq!((got.to_owned_event(), via), (e.clone(), Via::Confluent));
    // An id the registry does not have.
    codec.store().add_id(9, None).unwrap();
    buf[1..5].copy_from_slice(&9u32.to_be_bytes());
    assert_eq!(codec.decode_event(&buf), Err(DecodeError::NoSuchSchemaId(9)));
    assert_eq!(DecodeError::NoSuchSchemaId(9).reason(), DeadLetterReason::UnknownSchema);
    // Another schema's id is not an event.
    codec.store().add_id(10, Some(AGGREGATED_USAGE_AVSC)).unwrap();
    buf[1..5].copy_from_slice(&10u32.to_be_bytes());
    assert!(matches!(codec.decode_event(&buf), Err(DecodeError::UnknownSchema(_))));
}

/// A UsageEvent v2 as a third-party producer might write it: a field added
/// with a default, `attributes` (which has a default) left out, the fields
/// in another order.
pub(crate) const USAGE_EVENT_V2_AVSC: &str = r#"{"type":"record","name":"UsageEvent","namespace":"io.meterline","fields":[
  {"name":"event_id","type":"string"},{"name":"agent_id","type":"string"},
  {"name":"customer_id","type":"string"},{"name":"seq","type":["null","long"],"default":null},
  {"name":"service","type":"string"},{"name":"usage_type","type":"string"},{"name":"resource_id","type":"string"},
  {"name":"region","type":"string"},{"name":"quantity","type":"long"},
  {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
  {"name":"source","type":"string","default":"v2"}]}"#;

#[test]
fn a_newer_writer_schema_is_resolved_to_the_current_one() {
    let codec = Codec::new().unwrap();
    let v2 = Schema::parse_str(USAGE_EVENT_V2_AVSC).unwrap();
    let e = UsageEvent { attributes: Default::default(), ..sample_event() };
    let mut fields = vec![
        ("event_id".to_owned(), Value::String(e.event_id.clone())),
        ("agent_id".to_owned(), Value::String(e.agent_id.clone())),
        ("customer_id".to_owned(), Value::String(e.customer_id.clone())),
        ("seq".to_owned(), Value::Union(1, Box::new(Value::Long(e.seq.unwrap())))),
        ("service".to_owned(), Value::String(e.service.clone())),
        ("usage_type".to_owned(), Value::String(e.usage_type.clone())),
        ("resource_id".to_owned(), Value::String(e.resource_id.clone())),
        ("region".to_owned(), Value::String(e.region.clone())),
        ("quantity".to_owned(), Value::Long(e.quantity)),
        ("event_time".to_owned(), Value::TimestampMillis(e.event_time)),
    ];
    fields.push(("source".to_owned(), Value::String("python".into())));
    let body = apache_avro::to_avro_datum(&v2, Value::Record(fields)).unwrap();
    let mut payload = vec![0xC3, 0x01];
    payload.extend_from_slice(&canonical::fingerprint(USAGE_EVENT_V2_AVSC).unwrap().to_le_bytes());
    payload.extend_from_slice(&body);
    // Unknown until the store knows the writer schema.
    assert!(matches!(codec.decode_event(&payload), Err(DecodeError::UnknownSchema(_))));
    codec.store().add_schema(USAGE_EVENT_V2_AVSC).unwrap();
    assert_eq!(codec.decode_event(&payload).unwrap(), e);
    let mut scratch = Vec::new();
    let (got, current_body, via) = codec.decode_event_with(&payload, &mut scratch).unwrap();
    assert_eq!((got.to_owned_event(), via), (e.clone(), Via::Resolved));
    let mut current = Vec::new();
    codec.encode_event(&e, &mut current);
    assert_eq!(current_body, &current[10..], "resolved to the bytes of the current schema");
    // Truncated: an error, not a panic.
    assert!(codec.decode_event(&payload[..payload.len() - 1]).is_err());
}

/// Version 1 of UsageEvent (no incarnation), as agents before incarnations
/// write it with the spec fingerprint: read by hand (no resolution per
/// record), with an empty incarnation, byte for byte what apache-avro's
/// resolution gives; and the current schema keeps the incarnation.
#[test]
fn version_1_events_read_with_an_empty_incarnation_and_version_2_keeps_it() {
    let codec = Codec::new().unwrap();
    let e = sample_event();
    let mut current = Vec::new();
    codec.encode_event(&e, &mut current);
    let mut v1 = vec![0xC3, 0x01];
    v1.extend_from_slice(&canonical::fingerprint(USAGE_EVENT_V1_AVSC).unwrap().to_le_bytes());
    v1.extend_from_slice(&current[10..current.len() - 1]);
    // apache-avro: the v1 body is a valid v1 record, resolvable to v2.
    let writer = apache_avro::Schema::parse_str(USAGE_EVENT_V1_AVSC).unwrap();
    let reader = apache_avro::Schema::parse_str(USAGE_EVENT_AVSC).unwrap();
    let value = decode_generic(&writer, &v1[10..]).unwrap().resolve(&reader).unwrap();
    assert_eq!(event_from_value(value).unwrap(), e);
    assert_eq!(codec.decode_event(&v1).unwrap(), e);
    let mut scratch = Vec::new();
    let (got, body, via) = codec.decode_event_with(&v1, &mut scratch).unwrap();
    assert_eq!((got.to_owned_event(), body, via), (e.clone(), &current[10..], Via::Resolved));
    let with = UsageEvent { incarnation: "5f1c9a0e7d2b4c31".into(), ..e };
    let mut buf = Vec::new();
    codec.encode_event(&with, &mut buf);
    assert_eq!(codec.decode_event(&buf).unwrap(), with);
    assert_eq!(codec.decode_event_ref(&buf).unwrap().incarnation, "5f1c9a0e7d2b4c31");
    let (value, again) = testing::apache_round_trip(USAGE_EVENT_AVSC, &buf);
    assert_eq!(again, buf);
    assert_eq!(testing::field(&value, "incarnation"), &apache_avro::types::Value::String("5f1c9a0e7d2b4c31".into()));
}

/// The current schemas, by record name.
const CURRENT: [(&str, &str); 4] = [
    ("UsageEvent", USAGE_EVENT_AVSC),
    ("AggregatedUsage", AGGREGATED_USAGE_AVSC),
    ("DeadLetter", DEAD_LETTER_AVSC),
    ("InvoiceLine", INVOICE_LINE_AVSC),
];

/// A value of every field of `schema` (the types meterline's schemas use),
/// unions on their last branch. Decimals are 16 bytes long: apache-avro
/// 0.21 resolves no `bytes` decimal shorter than its precision could need
/// ("Precision 38 too small to hold decimal values with 1 bytes"), though
/// writers write the shortest two's complement.
fn sample(schema: &Schema) -> Value {
    match schema {
        Schema::Null => Value::Null,
        Schema::Boolean => Value::Boolean(true),
        Schema::Int => Value::Int(7),
        Schema::Long => Value::Long(7),
        Schema::String => Value::String("x".into()),
        Schema::Bytes => Value::Bytes(vec![7]),
        Schema::Decimal(_) => Value::Decimal(apache_avro::Decimal::from([[0u8; 15].as_slice(), &[7]].concat())),
        Schema::TimestampMillis => Value::TimestampMillis(7),
        Schema::Array(a) => Value::Array(vec![sample(&a.items)]),
        Schema::Map(m) => Value::Map([("k".to_owned(), sample(&m.types))].into()),
        Schema::Union(u) => Value::Union(u.variants().len() as u32 - 1, Box::new(sample(u.variants().last().unwrap()))),
        Schema::Enum(e) => Value::Enum(0, e.symbols[0].clone()),
        Schema::Record(r) => Value::Record(r.fields.iter().map(|f| (f.name.clone(), sample(&f.schema))).collect()),
        other => panic!("no sample value for {other:?}"),
    }
}

/// `history::SCHEMAS` is `schemas/avro/history/`, and the current version
/// of each schema there reads it: its fields, then fields with defaults
/// (what the hand decoders, which read an earlier body as a prefix of the
/// current one, rely on), and a record of it resolves to the current
/// schema with those defaults (apache-avro's `SchemaCompatibility` cannot
/// tell for decimals).
#[test]
fn every_earlier_schema_version_is_read_by_the_current_one() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/avro/history");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "avsc"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let mut listed: Vec<String> = history::SCHEMAS.iter().map(|s| (*s).to_owned()).collect();
    files.sort();
    listed.sort();
    assert_eq!(files, listed, "history::SCHEMAS lists every file of {}", dir.display());
    let mut names = Vec::new();
    for avsc in history::SCHEMAS {
        let writer = Schema::parse_str(avsc).unwrap();
        let Schema::Record(w) = &writer else { panic!("not a record") };
        let name = w.name.name.clone();
        let (_, current) = CURRENT.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{name}: no current schema"));
        let reader = Schema::parse_str(current).unwrap();
        let Schema::Record(r) = &reader else { panic!("not a record") };
        assert_ne!(canonical::fingerprint(avsc).unwrap(), canonical::fingerprint(current).unwrap(), "{name}: unchanged");
        assert!(r.fields.len() > w.fields.len(), "{name}");
        for (i, f) in r.fields.iter().enumerate() {
            match w.fields.get(i) {
                Some(old) => assert_eq!((&f.name, &f.schema), (&old.name, &old.schema), "{name}: field {i} changed"),
                None => assert!(f.default.is_some(), "{name}: appended field {} has no default", f.name),
            }
        }
        let body = apache_avro::to_avro_datum(&writer, sample(&writer)).unwrap();
        let value = apache_avro::from_avro_datum(&writer, &mut body.as_slice(), Some(&reader))
            .unwrap_or_else(|e| panic!("{name}: a record of the earlier version does not resolve: {e}"));
        assert!(value.validate(&reader), "{name}");
        for f in &r.fields[w.fields.len()..] {
            if let Some(serde_json::Value::String(default)) = &f.default {
                assert_eq!(field(&value, &f.name), &Value::String(default.clone()), "{name}.{}", f.name);
            }
        }
        names.push(name);
    }
    names.sort();
    assert_eq!(names, ["InvoiceLine", "UsageEvent"]);
}
