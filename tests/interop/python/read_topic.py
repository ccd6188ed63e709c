#!/usr/bin/env python3
"""Reads a whole Kafka topic (every partition, from the beginning to the end offset
it had at start, read_committed) and prints one JSON object per record, sorted by
(partition, offset):

    {"partition":p,"offset":o,"key":"<utf8>"|null,"value":{...}}

with the value rendered as in interop_common.py (same bytes as the Java tool's
`read`). Uses confluent-kafka (librdkafka) and fastavro only.

    read_topic.py --bootstrap H:P --topic T --schema F.avsc
                  [--framing single-object|confluent] [--registry URL] [--timeout-s 60]

single-object: the payload must start with C3 01 and the schema's fingerprint
(fastavro); the body is decoded with fastavro.schemaless_reader and must use
every byte. confluent: magic 0 + 4-byte big-endian schema id, decoded with
confluent_kafka.schema_registry.avro.AvroDeserializer (writer schema fetched by
id, resolved to the reader .avsc); the body is also decoded strictly to catch
trailing bytes and invalid decimals.

Records that fail are printed to stderr and not to stdout; the exit code is then
1. Exit 1 too when the end offsets are not reached within --timeout-s; 2 on a
usage or setup error (unknown topic, broker unreachable).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastavro  # noqa: E402
from confluent_kafka import OFFSET_BEGINNING, Consumer, IsolationLevel, KafkaError, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient, OffsetSpec  # noqa: E402

import interop_common as ic  # noqa: E402


class SingleObjectDecoder:
    def __init__(self, schema: dict, schema_path: str):
        self.fp = ic.fingerprint_bytes(schema)
        self.parsed = fastavro.parse_schema(ic.strip_logical_types(schema))
        self.schema_path = schema_path

    def decode(self, v: bytes, renderer: ic.Renderer):
        if len(v) < 10 or v[:2] != ic.SINGLE_OBJECT_MAGIC:
            raise ic.DecodeError(
                f"not Avro single-object encoded: expected magic c301, payload starts {v[:10].hex()} ({len(v)} bytes)"
            )
        if v[2:10] != self.fp:
            raise ic.DecodeError(
                f"schema fingerprint {v[2:10].hex()} in the header does not match {self.schema_path} ({self.fp.hex()})"
            )
        return renderer.render(strict_body(v, 10, self.parsed, None))


def strict_body(v: bytes, off: int, writer, reader):
    bio = io.BytesIO(v)
    bio.seek(off)
    try:
        rec = fastavro.schemaless_reader(bio, writer, reader)
    except Exception as e:  # noqa: BLE001 - any fastavro failure is a decode failure
        raise ic.DecodeError(f"Avro body does not decode: {type(e).__name__}: {e}") from e
    if bio.tell() != len(v):
        raise ic.DecodeError(f"trailing bytes after the Avro record ({len(v) - bio.tell()} of {len(v)} bytes)")
    return rec


class ConfluentDecoder:
    def __init__(self, schema: dict, registry: str, topic: str):
        import json

        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        from confluent_kafka.schema_registry import topic_subject_name_strategy

        # A request timeout (the client's default is none: a registry that
        # never answers hung this reader for good; timeouts are retried), and
        # the plain {topic}-value subject: the default strategy of 2.16 first
        # asks the associations API, which Apicurio does not serve.
        self.client = SchemaRegistryClient({"url": registry, "timeout": ic.REGISTRY_TIMEOUT_S})
        self.deser = AvroDeserializer(self.client, json.dumps(schema), conf={"subject.name.strategy": topic_subject_name_strategy})
        self.ctx = SerializationContext(topic, MessageField.VALUE)
        self.reader_raw = fastavro.parse_schema(ic.strip_logical_types(schema))
        self.writers: dict[int, object] = {}

    def decode(self, v: bytes, renderer: ic.Renderer):
        import json

        if len(v) < 5 or v[0] != ic.CONFLUENT_MAGIC:
            raise ic.DecodeError(
                f"not Confluent wire format: expected magic byte 00, payload starts {v[:10].hex()} ({len(v)} bytes)"
            )
        try:
            rec = self.deser(v, self.ctx)
        except Exception as e:  # noqa: BLE001
            raise ic.DecodeError(f"AvroDeserializer: {type(e).__name__}: {e}") from e
        # Strict second pass on the raw body (AvroDeserializer ignores trailing bytes).
        sid = int.from_bytes(v[1:5], "big")
        if sid not in self.writers:
            w = self.client.get_schema(sid)
            if (w.schema_type or "AVRO") != "AVRO":
                raise ic.DecodeError(f"schema id {sid} is {w.schema_type}, not AVRO")
            self.writers[sid] = fastavro.parse_schema(ic.strip_logical_types(json.loads(w.schema_str)))
        raw = strict_body(v, 5, self.writers[sid], self.reader_raw)
        # Render the raw decode (catches zero-length and over-precision decimals,
        # which fastavro's decimal reader turns into 0 or silently rounds), and
        # require AvroDeserializer's result to render the same.
        out = renderer.render(raw)
        via_deser = renderer.render(rec)
        if via_deser != out:
            raise ic.DecodeError(f"AvroDeserializer gave {ic.dumps(via_deser)} but the raw body is {ic.dumps(out)}")
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--schema", required=True)
    ap.add_argument("--framing", choices=["single-object", "confluent"], default="single-object")
    ap.add_argument("--registry")
    ap.add_argument("--timeout-s", type=float, default=60.0)
    args = ap.parse_args()
    if args.framing == "confluent" and not args.registry:
        ap.error("--framing confluent needs --registry")

    schema = ic.load_schema(args.schema)
    renderer = ic.Renderer(schema)
    if args.framing == "single-object":
        decoder = SingleObjectDecoder(schema, args.schema)
    else:
        decoder = ConfluentDecoder(schema, args.registry, args.topic)

    deadline = time.monotonic() + args.timeout_s
    common = {"bootstrap.servers": args.bootstrap, "client.id": "meterline-interop-python", "logger": ic.librdkafka_logger()}
    consumer = Consumer(
        {
            **common,
            "group.id": f"meterline-interop-{uuid.uuid4()}",  # never joined: assign() only, no commits
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "allow.auto.create.topics": False,
        }
    )
    try:
        md = consumer.list_topics(args.topic, timeout=max(1.0, args.timeout_s))
    except Exception as e:  # noqa: BLE001
        ic.eprint(f"error: metadata from {args.bootstrap}: {e}")
        return 2
    tmd = md.topics.get(args.topic)
    if tmd is None or tmd.error is not None or not tmd.partitions:
        ic.eprint(f"error: topic {args.topic} not found on {args.bootstrap}: {tmd.error if tmd else ''}")
        return 2
    parts = sorted(tmd.partitions)

    # End offsets at start, read_committed: the last stable offset. They count
    # transaction markers, so a partition is done when its position reaches the
    # end, not when a record at end - 1 arrived (that may be a marker).
    admin = AdminClient(common)
    futs = admin.list_offsets(
        {TopicPartition(args.topic, p): OffsetSpec.latest() for p in parts},
        isolation_level=IsolationLevel.READ_COMMITTED,
        request_timeout=max(1.0, args.timeout_s),
    )
    end = {tp.partition: f.result().offset for tp, f in futs.items()}

    consumer.assign([TopicPartition(args.topic, p, OFFSET_BEGINNING) for p in parts])
    lines: dict[int, dict[int, str]] = {p: {} for p in parts}
    failures = 0
    records = 0

    def position(p: int) -> int:
        return consumer.position([TopicPartition(args.topic, p)])[0].offset

    # A partition whose start is already its end (empty, or all records expired)
    # needs no reading; the low watermark tells.
    remaining = set()
    for p in parts:
        low, _high = consumer.get_watermark_offsets(TopicPartition(args.topic, p), timeout=max(1.0, args.timeout_s))
        if low < end[p]:
            remaining.add(p)

    while remaining:
        if time.monotonic() > deadline:
            detail = "; ".join(f"{p}: position {position(p)} < end {end[p]}" for p in sorted(remaining))
            ic.eprint(f"error: timed out after {args.timeout_s} s before reaching the end offsets: {detail}")
            failures += 1
            break
        for m in consumer.consume(num_messages=1000, timeout=0.2):
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    if m.offset() >= end.get(m.partition(), 0):
                        remaining.discard(m.partition())
                    continue
                ic.eprint(f"error: consumer: {err}")
                if err.fatal() or not err.retriable():
                    failures += 1
                continue
            p, o = m.partition(), m.offset()
            if o >= end[p]:
                remaining.discard(p)
                continue  # past the snapshot taken at start
            records += 1
            where = f"partition {p} offset {o}"
            key = m.key()
            if key is not None:
                try:
                    key = key.decode("utf-8")
                except UnicodeDecodeError:
                    ic.eprint(f"error: {where}: key is not UTF-8: {key.hex()}")
                    failures += 1
                    continue
            v = m.value()
            if v is None:
                value = None  # tombstone
            else:
                try:
                    value = decoder.decode(v, renderer)
                except ic.DecodeError as e:
                    ic.eprint(f"error: {where}: {e}")
                    failures += 1
                    continue
            lines[p][o] = ic.dumps({"partition": p, "offset": o, "key": key, "value": value})
        for p in list(remaining):
            if position(p) >= end[p]:
                remaining.discard(p)
    consumer.close()

    out = sys.stdout
    for p in parts:
        for o in sorted(lines[p]):
            out.write(lines[p][o])
            out.write("\n")
    out.flush()
    ic.eprint(
        f"read {records} records from {len(parts)} partitions of {args.topic} "
        f"(end offsets {dict(sorted(end.items()))}), {failures} failures"
    )
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.stdout.reconfigure(encoding="utf-8")
    sys.exit(main())
