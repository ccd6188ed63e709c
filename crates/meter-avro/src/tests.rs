use super::*;
use apache_avro::types::Value;
use apache_avro::{GenericSingleObjectReader, GenericSingleObjectWriter};
use proptest::prelude::*;

fn sample_event() -> UsageEvent {
    let mut attributes = BTreeMap::new();
    attributes.insert("instance_type".to_owned(), "m5.large".to_owned());
    UsageEvent {
        event_id: meter_model::event_id("agent-1", "cust-7", 42),
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

/// Decodes `bytes` with apache-avro's generic reader and encodes the value
/// again with its generic writer: the bytes must come back unchanged.
fn apache_round_trip(avsc: &str, bytes: &[u8]) -> (Value, Vec<u8>) {
    let schema = Schema::parse_str(avsc).unwrap();
    let reader = GenericSingleObjectReader::new(schema.clone()).unwrap();
    let value = reader.read_value(&mut &bytes[..]).unwrap();
    let mut writer = GenericSingleObjectWriter::new_with_capacity(&schema, 256).unwrap();
    let mut out = Vec::new();
    writer.write_value_ref(&value, &mut out).unwrap();
    (value, out)
}

fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    match v {
        Value::Record(fields) => &fields.iter().find(|(n, _)| n == name).unwrap().1,
        _ => panic!("not a record"),
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
        buf.pop(); // the empty map's terminating 0
        let mut w = binary::Writer(&mut buf);
        for (k, v) in &entries {
            w.long(1);
            w.string(k);
            w.string(v);
        }
        w.long(0);
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
