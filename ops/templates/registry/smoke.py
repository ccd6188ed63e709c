#!/usr/bin/env python3
"""Smoke test of the local schema registry through Confluent's Python client.

    python3 ops/templates/registry/smoke.py [--url URL] [--restart] [--keep]

Needs a running registry (`ops/registry start`) and
`pip install 'confluent-kafka[avro]'` (pulls fastavro, attrs, cachetools,
certifi, authlib and httpx2 -- httpx on Python < 3.10).

Checks, against subject test-value (and test2-value for the id questions):
  * registering schemas/avro/usage_event.avsc returns an id, idempotently;
  * BACKWARD compatibility set on the subject is reported back;
  * an incompatible change (new field without default) is refused (409) and
    test_compatibility says False; a compatible one (new field with default)
    is accepted as version 2 with a new id;
  * AvroSerializer writes magic byte 0 + 4-byte big-endian schema id + Avro
    body, and AvroDeserializer reads it back (with the writer schema, and
    with the old schema as reader schema);
  * ids are global: the same schema under another subject gets the same id,
    GET /schemas/ids/{id} serves it, and with --restart (runs
    `ops/registry restart`, file storage) ids, versions and levels survive.
Exits 1 on the first failed check. Deletes the test subjects at the end
unless --keep.
"""

import argparse
import datetime
import io
import json
import os
import struct
import subprocess
import sys

import fastavro
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
AVSC = os.path.join(REPO, "schemas", "avro", "usage_event.avsc")
SUBJECT = "test-value"
SUBJECT2 = "test2-value"
TOPIC = "test"  # TopicNameStrategy: value subject "test-value"


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)
    print(f"ok: {msg}")


def info(msg):
    print(f"info: {msg}")


def delete_subject(client, subject):
    for permanent in (False, True):
        try:
            client.delete_subject(subject, permanent=permanent)
        except SchemaRegistryError as e:
            if e.http_status_code != 404:
                raise


def with_field(schema, field, at=None):
    s = json.loads(json.dumps(schema))
    if at is None:
        s["fields"].append(field)
    else:
        s["fields"].insert(at, field)
    return s


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=os.environ.get("REGISTRY_URL", "http://127.0.0.1:8081/apis/ccompat/v7"))
    ap.add_argument("--restart", action="store_true", help="restart the registry (ops/registry restart) midway")
    ap.add_argument("--keep", action="store_true", help="keep the test subjects")
    args = ap.parse_args()

    conf = {"url": args.url, "timeout": 20}  # fail, not hang, if a response never comes
    client = SchemaRegistryClient(conf)
    v1 = json.load(open(AVSC))
    v1_str = json.dumps(v1)
    # compatible: a new optional field with a default
    v2 = with_field(v1, {"name": "unit", "type": ["null", "string"], "default": None})
    v2_str = json.dumps(v2)
    # incompatible under BACKWARD: a new field without default (v2 readers cannot read v1 data)
    bad = with_field(v1, {"name": "currency", "type": "string"})

    for s in (SUBJECT, SUBJECT2):
        delete_subject(client, s)

    # ---- register -------------------------------------------------------
    id1 = client.register_schema(SUBJECT, Schema(v1_str, "AVRO"))
    check(isinstance(id1, int) and id1 > 0, f"registered usage_event.avsc under {SUBJECT}: id {id1}")
    check(client.register_schema(SUBJECT, Schema(v1_str, "AVRO")) == id1, "re-registering the same schema returns the same id")
    reg = client.lookup_schema(SUBJECT, Schema(v1_str, "AVRO"))
    check(reg.schema_id == id1 and reg.version == 1, f"lookup_schema finds it as version 1 (id {reg.schema_id})")

    # ---- compatibility --------------------------------------------------
    info(f"global compatibility level: {client.get_compatibility()}")
    resp = client.set_compatibility(SUBJECT, "BACKWARD")
    # the client returns the PUT /config/{subject} body (a dict), despite its docstring
    level = resp.get("compatibility") if isinstance(resp, dict) else resp
    check(level == "BACKWARD", f"set_compatibility({SUBJECT}, BACKWARD) -> {resp}")
    check(client.get_compatibility(SUBJECT) == "BACKWARD", f"get_compatibility({SUBJECT}) -> BACKWARD")

    check(client.test_compatibility(SUBJECT, Schema(json.dumps(bad), "AVRO")) is False,
          "test_compatibility: a new field without default is incompatible")
    try:
        client.register_schema(SUBJECT, Schema(json.dumps(bad), "AVRO"))
        fail("an incompatible schema was registered")
    except SchemaRegistryError as e:
        check(e.http_status_code == 409, f"registering it is refused: HTTP {e.http_status_code} error_code {e.error_code}")

    check(client.test_compatibility(SUBJECT, Schema(v2_str, "AVRO")) is True,
          "test_compatibility: a new field with default is compatible")
    id2 = client.register_schema(SUBJECT, Schema(v2_str, "AVRO"))
    check(id2 != id1, f"registered the compatible change: id {id2}")
    latest = client.get_latest_version(SUBJECT)
    check(latest.version == 2 and latest.schema_id == id2, f"latest version of {SUBJECT} is 2 (id {latest.schema_id})")
    check(client.get_versions(SUBJECT) == [1, 2], "versions [1, 2]")

    # ---- ids ------------------------------------------------------------
    id1b = client.register_schema(SUBJECT2, Schema(v1_str, "AVRO"))
    check(id1b == id1, f"the same schema under {SUBJECT2} gets the same id ({id1b}): ids are global, per content")
    got = client.get_schema(id1)
    check(got.schema_type == "AVRO" and fastavro.parse_schema(json.loads(got.schema_str)) == fastavro.parse_schema(v1),
          f"GET /schemas/ids/{id1} serves usage_event v1")

    if args.restart:
        subprocess.run([os.path.join(REPO, "ops", "registry"), "restart"], check=True)
        client = SchemaRegistryClient(conf)  # no cached ids
        check(client.lookup_schema(SUBJECT, Schema(v2_str, "AVRO")).schema_id == id2, "after restart: same id for v2")
        check(client.get_versions(SUBJECT) == [1, 2], "after restart: versions [1, 2]")
        check(client.get_compatibility(SUBJECT) == "BACKWARD", "after restart: subject level BACKWARD")
        check(client.register_schema(SUBJECT2, Schema(v1_str, "AVRO")) == id1, "after restart: same id for v1")

    # ---- serde round trip -------------------------------------------------
    record = {
        "event_id": "ev-1", "agent_id": "agent-1", "seq": 42, "customer_id": "cust-1",
        "service": "compute", "usage_type": "BoxUsage:m5.large", "resource_id": "i-0123",
        "region": "eu-west-1", "quantity": 3600,
        "event_time": datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
        "attributes": {"env": "dev"}, "unit": "seconds",
    }
    ctx = SerializationContext(TOPIC, MessageField.VALUE)
    ser = AvroSerializer(client, v2_str)  # auto.register.schemas: finds v2 under test-value
    payload = ser(record, ctx)
    magic, sid = struct.unpack(">bI", payload[:5])
    check(magic == 0, "wire format: magic byte 0")
    check(sid == id2, f"wire format: 4-byte big-endian schema id {sid} == id of v2")
    body = fastavro.schemaless_reader(io.BytesIO(payload[5:]), fastavro.parse_schema(v2))
    check(body == record, "wire format: the rest is the plain Avro body of the record")

    out = AvroDeserializer(client)(payload, ctx)
    check(out == record, "AvroDeserializer (writer schema from the registry) round-trips the record")
    old = AvroDeserializer(client, v1_str)(payload, ctx)
    check(old == {k: v for k, v in record.items() if k != "unit"},
          "AvroDeserializer with v1 as reader schema reads v2 data (schema evolution)")

    # ---- delete -----------------------------------------------------------
    if not args.keep:
        for s in (SUBJECT, SUBJECT2):
            delete_subject(client, s)
        check(SUBJECT not in client.get_subjects(), "test subjects deleted")
        again = client.register_schema(SUBJECT, Schema(v1_str, "AVRO"))
        info(f"re-registering v1 after a permanent subject delete: id {again} (was {id1})")
        delete_subject(client, SUBJECT)
    print("smoke: all checks passed")


if __name__ == "__main__":
    main()
