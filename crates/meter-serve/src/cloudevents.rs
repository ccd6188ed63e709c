//! CloudEvents 1.0 (structured JSON and JSON batch) to usage events.
//!
//! | CloudEvent | usage event |
//! | --- | --- |
//! | `subject` | `customer_id` |
//! | `type` | `service/usage_type`, split at the first `/` |
//! | `source`, `id` | `event_id` = `agent/customer/source#id` (see [`event_id`]) |
//! | `time` | `event_time` (required: a retry must carry the same time) |
//! | `data.quantity` | `quantity` (integer, or a string of digits) |
//! | `data.resource`, `data.region`, `data.attributes` | `resource_id`, `region`, `attributes` |
//!
//! The agent id is the API key's. Events have no `seq`: the processor
//! deduplicates them by `event_id` (a replay of the same bytes is a
//! duplicate; the same id with other content is `event_id_conflict`).

use std::collections::BTreeMap;

use meter_model::UsageEvent;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The incarnation of every event `meter serve` produces: the events have
/// no seq stream to keep apart, and a processor that refuses events
/// without an incarnation (`processor.accept_no_incarnation = false`)
/// still takes them.
pub const INCARNATION: &str = "http";

/// The usage event id of CloudEvent `source`/`id` posted for `customer` as
/// `agent`: `agent/customer/source#id`, with `%`, `/` and `#` in the
/// first three written `%25`, `%2F` and `%23`, so that no two distinct
/// (agent, customer, source, id) share an id. The processor deduplicates
/// seq-less events by id within a partition and day, whoever sent them:
/// without the agent and the customer in it, two tenants that both post
/// `source "/app", id "1"` would collide, and the second would be
/// dead-lettered as `event_id_conflict` after its 202.
pub fn event_id(agent: &str, customer: &str, source: &str, id: &str) -> String {
    fn push_escaped(out: &mut String, s: &str) {
        for c in s.chars() {
            match c {
                '%' => out.push_str("%25"),
                '/' => out.push_str("%2F"),
                '#' => out.push_str("%23"),
                c => out.push(c),
            }
        }
    }
    let mut out = String::with_capacity(agent.len() + customer.len() + source.len() + id.len() + 3);
    push_escaped(&mut out, agent);
    out.push('/');
    push_escaped(&mut out, customer);
    out.push('/');
    push_escaped(&mut out, source);
    out.push('#');
    out.push_str(id);
    out
}

/// The reason given to an event that is not a CloudEvent we can map.
pub const INVALID: &str = "invalid_cloudevent";

/// How the body is framed, from its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `application/cloudevents+json`: one event.
    Structured,
    /// `application/cloudevents-batch+json`: an array of events.
    Batch,
    /// `application/json`: either.
    Json,
}

impl Framing {
    /// From a `Content-Type` value; `None` for any other media type.
    pub fn from_content_type(value: &str) -> Option<Framing> {
        let media = value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        match media.as_str() {
            "application/cloudevents+json" => Some(Framing::Structured),
            "application/cloudevents-batch+json" => Some(Framing::Batch),
            "application/json" => Some(Framing::Json),
            _ => None,
        }
    }
}

/// One event of a request, its JSON text not parsed yet: a batch is split
/// without building a tree of it, and each event is then read straight
/// into typed fields (so one bad event is named by its index).
pub type RawEvent = Box<RawValue>;

/// The body as events, or why it is not JSON of the framing's shape.
pub fn split(body: &[u8], framing: Framing) -> Result<Vec<RawEvent>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not JSON: not UTF-8 ({e})"))?;
    let first = text.trim_start().as_bytes().first().copied();
    match (framing, first) {
        (Framing::Structured, Some(b'[')) => Err("application/cloudevents+json holds one event, not an array: \
             send a batch as application/cloudevents-batch+json"
            .into()),
        (Framing::Batch, Some(b'{')) => Err("application/cloudevents-batch+json is an array of events".into()),
        (_, Some(b'[')) => serde_json::from_str::<Vec<RawEvent>>(text).map_err(|e| format!("the body is not JSON: {e}")),
        (_, Some(b'{')) => {
            let event: RawEvent = serde_json::from_str(text).map_err(|e| format!("the body is not JSON: {e}"))?;
            Ok(vec![event])
        }
        _ => match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Err(e) => Err(format!("the body is not JSON: {e}")),
            Ok(_) => Err("the body is neither an event (a JSON object) nor a batch (an array)".into()),
        },
    }
}

#[derive(Deserialize)]
struct Envelope {
    specversion: Option<String>,
    id: Option<String>,
    source: Option<String>,
    #[serde(rename = "type")]
    ty: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    datacontenttype: Option<String>,
    data: Option<Box<RawValue>>,
    data_base64: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Data {
    quantity: Box<RawValue>,
    #[serde(default)]
    resource: String,
    #[serde(default)]
    region: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

/// `data.quantity`: a JSON integer, or a string of digits (for clients
/// whose numbers are doubles).
fn quantity(raw: &RawValue) -> Result<i64, String> {
    let text = raw.get();
    if text.starts_with('"') {
        let s: String = serde_json::from_str(text).map_err(|e| format!("data.quantity: {e}"))?;
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("data.quantity {text} is not an integer"));
        }
        return s.parse().map_err(|_| format!("data.quantity {text} is beyond 64 bits"));
    }
    let is_integer = text.bytes().enumerate().all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
        && text.len() > usize::from(text.starts_with('-'));
    if !is_integer {
        return Err(format!("data.quantity {text} is not an integer"));
    }
    text.parse().map_err(|_| format!("data.quantity {text} is not a 64-bit integer"))
}

/// The usage event of one CloudEvent from `agent_id`, or why it is not one.
pub fn to_usage_event(event: &RawValue, agent_id: &str) -> Result<UsageEvent, String> {
    let e: Envelope = serde_json::from_str(event.get()).map_err(|e| format!("not a CloudEvent: {e}"))?;
    let required = |v: Option<String>, name: &str| v.filter(|s| !s.is_empty()).ok_or_else(|| format!("{name} is required"));
    let spec = required(e.specversion, "specversion")?;
    if spec != "1.0" {
        return Err(format!("specversion {spec:?} is not 1.0"));
    }
    let id = required(e.id, "id")?;
    let source = required(e.source, "source")?;
    let ty = required(e.ty, "type")?;
    let customer = required(e.subject, "subject (the customer id)")?;
    let time = required(e.time, "time")?;
    let event_time = meter_model::date::parse_rfc3339_millis(&time).map_err(|m| format!("time: {m}"))?;
    let (service, usage_type) = ty
        .split_once('/')
        .filter(|(s, u)| !s.is_empty() && !u.is_empty())
        .ok_or_else(|| format!("type {ty:?} is not service/usage_type"))?;
    if let Some(ct) = e.datacontenttype.as_deref() {
        if !ct.split(';').next().unwrap_or_default().trim().eq_ignore_ascii_case("application/json") {
            return Err(format!("datacontenttype {ct:?}: data must be application/json"));
        }
    }
    if e.data_base64.is_some() {
        return Err("data_base64 is not accepted: data must be a JSON object".into());
    }
    let data: Data = serde_json::from_str(e.data.ok_or("data is required")?.get()).map_err(|e| format!("data: {e}"))?;
    let quantity = quantity(&data.quantity)?;
    Ok(UsageEvent {
        event_id: event_id(agent_id, &customer, &source, &id),
        agent_id: agent_id.to_owned(),
        seq: None,
        customer_id: customer,
        service: service.to_owned(),
        usage_type: usage_type.to_owned(),
        resource_id: data.resource,
        region: data.region,
        quantity,
        event_time,
        attributes: data.attributes,
        incarnation: INCARNATION.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn raw(v: &Value) -> Box<RawValue> {
        RawValue::from_string(v.to_string()).expect("json")
    }

    fn event() -> Value {
        json!({
            "specversion": "1.0", "id": "e-1", "source": "//web/checkout", "type": "compute/BoxUsage:m5.large",
            "subject": "cust-1", "time": "2026-11-30T12:00:00.250+01:00", "traceparent": "an extension",
            "data": {"quantity": "3600", "resource": "i-1", "region": "eu-west-1", "attributes": {"k": "v"}}
        })
    }

    #[test]
    fn a_cloudevent_maps_to_a_usage_event() {
        let u = to_usage_event(&raw(&event()), "api-web").expect("maps");
        assert_eq!(u.event_id, "api-web/cust-1/%2F%2Fweb%2Fcheckout#e-1");
        // Distinct (agent, customer, source, id) never share an id.
        assert_ne!(event_id("a", "c", "x#y", "z"), event_id("a", "c", "x", "y#z"));
        assert_ne!(event_id("a/b", "c", "s", "i"), event_id("a", "b/c", "s", "i"));
        assert_ne!(event_id("a", "c", "s%23", "i"), event_id("a", "c", "s#", "i"));
        assert_eq!((u.customer_id.as_str(), u.service.as_str(), u.usage_type.as_str()), ("cust-1", "compute", "BoxUsage:m5.large"));
        assert_eq!((u.quantity, u.resource_id.as_str(), u.region.as_str()), (3600, "i-1", "eu-west-1"));
        assert_eq!(u.event_time, meter_model::date::parse_utc_millis("2026-11-30T11:00:00Z").expect("t") + 250);
        assert_eq!((u.agent_id.as_str(), u.seq, u.incarnation.as_str()), ("api-web", None, INCARNATION));
        assert_eq!(u.attributes.get("k").map(String::as_str), Some("v"));
    }

    #[test]
    fn what_cannot_be_mapped_is_named() {
        let cases: [(&str, Value, &str); 8] = [
            ("specversion", json!("0.3"), "specversion \"0.3\" is not 1.0"),
            ("time", Value::Null, "time is required"),
            ("time", json!("yesterday"), "time: \"yesterday\" is not an RFC 3339"),
            ("type", json!("BoxUsage"), "type \"BoxUsage\" is not service/usage_type"),
            ("subject", json!(""), "subject (the customer id) is required"),
            ("data", json!({"quantity": 1.5}), "data.quantity 1.5 is not an integer"),
            ("data", json!({"quantity": 1, "quantitiy": 2}), "data: unknown field `quantitiy`"),
            ("datacontenttype", json!("text/plain"), "datacontenttype \"text/plain\""),
        ];
        for (field, value, want) in cases {
            let mut e = event();
            e[field] = value;
            let got = to_usage_event(&raw(&e), "a").expect_err(field);
            assert!(got.starts_with(want), "{field}: {got}");
        }
        let mut e = event();
        e["data"]["quantity"] = json!(-5);
        assert_eq!(to_usage_event(&raw(&e), "a").expect("negative is the processor's to refuse").quantity, -5);
        for (q, want) in [
            (json!("12"), Ok(12)),
            (json!(1e3), Err("data.quantity 1000.0 is not an integer")),
            (json!("1.5"), Err("data.quantity \"1.5\" is not an integer")),
            (json!(u64::MAX), Err("data.quantity 18446744073709551615 is not a 64-bit integer")),
        ] {
            let mut e = event();
            e["data"]["quantity"] = q;
            assert_eq!(to_usage_event(&raw(&e), "a").map(|u| u.quantity), want.map_err(str::to_owned));
        }
    }

    #[test]
    fn the_content_type_decides_the_framing() {
        assert_eq!(Framing::from_content_type("application/cloudevents+json; charset=utf-8"), Some(Framing::Structured));
        assert_eq!(Framing::from_content_type("application/cloudevents-batch+json"), Some(Framing::Batch));
        assert_eq!(Framing::from_content_type("text/plain"), None);
        assert!(split(b"[{}]", Framing::Structured).is_err());
        assert!(split(b"{}", Framing::Batch).is_err());
        assert_eq!(split(b"[{}, {}]", Framing::Json).expect("array").len(), 2);
        assert!(split(b"{\"a\":", Framing::Json).expect_err("malformed").starts_with("the body is not JSON"));
        assert!(split(b"3", Framing::Json).is_err());
    }
}
