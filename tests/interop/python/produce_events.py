#!/usr/bin/env python3
"""Produces meterline UsageEvents with confluent-kafka + fastavro (no meterline
code) and writes the ground-truth ledger in meterline's CSV ledger format.

    produce_events.py --bootstrap H:P --topic T --schema schemas/avro/usage_event.avsc
        [--framing single-object|confluent] [--registry URL]
        --customers N --seconds S --start-ms T --agent-id A --ledger OUT.csv
        [--seed K] [--duplicates-percent P] [--duplicate-window W]
        [--region R] [--catalog schemas/catalog.toml]
        [--first-seq N] [--incarnation I] [--sign KEY_ID:SECRET_HEX]

For every second s in [0, S) and every customer c in [0, N), three events
(usage types checked against the catalog at start, with their base units):

  compute         BoxUsage:m5.large      seconds       quantity 1, resource i-<agent>-<c>
  object-storage  TimedStorage-ByteSec   byte-seconds  bytes stored that second (grows), resource bucket-<c>
  cdn             Requests-HTTPS         requests      1..500, resource dist-<c>

customer_id = cust-<c, 4 digits> (also the record key, UTF-8); event_id =
"<agent_id>:<customer_id>:<seq>"; seq counts from 1 per (agent_id, customer_id);
event_time = start_ms + s * 1000; attributes {}. The values depend only on the
arguments (and --seed).

With --duplicates-percent P, after each event, with probability P %, one of the
customer's last W (default 10) events is sent again byte for byte (same seq and
event_id). Duplicates are not in the ledger: a correct pipeline drops them.

Producer: enable.idempotence, acks=all, partitioner murmur2_random (the Java
client's default partitioning of keyed records; librdkafka's own default,
consistent_random, hashes with CRC32 and puts keys elsewhere). Every delivery
report is checked. The ledger is written only when every record was delivered.

With --sign, every record carries the header meterline-signature =
"v1:<key id>:<hex HMAC-SHA256(secret, record value)>": the signing recipe for
third-party producers (hmac and hashlib of the standard library).

stdout: one JSON summary line. Exit 0 on success, 1 on a delivery failure, 2 on
a usage/setup error.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import collections
import io
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastavro  # noqa: E402
from confluent_kafka import KafkaException, Producer  # noqa: E402

import interop_common as ic  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CATALOG = os.path.normpath(os.path.join(HERE, "..", "..", "..", "schemas", "catalog.toml"))

LEDGER_HEADER = "customer_id,service,usage_type,region,minute_start_ms,event_count,quantity_sum"
MINUTE_MS = 60_000
SIGNATURE_HEADER = "meterline-signature"

# (service, usage_type, base unit it must have in the catalog)
USAGE_TYPES = [
    ("compute", "BoxUsage:m5.large", "seconds"),
    ("object-storage", "TimedStorage-ByteSec", "byte-seconds"),
    ("cdn", "Requests-HTTPS", "requests"),
]


def write_ledger(path: str, ledger: dict) -> None:
    # Rust's Ledger is a BTreeMap ordered by (granularity, window_start, customer_id,
    # service, usage_type, region); str order here is code-point order = UTF-8 byte order.
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(LEDGER_HEADER + "\n")
        for (ws, cust, svc, ut, region), (count, qsum) in sorted(ledger.items()):
            f.write(f"{cust},{svc},{ut},{region},{ws},{count},{qsum}\n")
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--schema", required=True)
    ap.add_argument("--framing", choices=["single-object", "confluent"], default="single-object")
    ap.add_argument("--registry")
    ap.add_argument("--customers", type=int, required=True)
    ap.add_argument("--seconds", type=int, required=True)
    ap.add_argument("--start-ms", type=int, required=True)
    ap.add_argument("--agent-id", required=True)
    ap.add_argument("--ledger", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--duplicates-percent", type=float, default=0.0)
    ap.add_argument("--duplicate-window", type=int, default=10)
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--catalog", default=DEFAULT_CATALOG)
    ap.add_argument("--partitioner", default="murmur2_random", help="librdkafka partitioner (default murmur2_random)")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="flush timeout")
    ap.add_argument("--first-seq", type=int, default=1, help="the first seq of every customer's stream (default 1)")
    ap.add_argument("--incarnation", default=None, help="the incarnation field (omitted: the schema's default)")
    ap.add_argument(
        "--sign",
        default=None,
        metavar="KEY_ID:SECRET_HEX",
        help="sign every record: header meterline-signature = v1:<key id>:<hex HMAC-SHA256(secret, record value)>",
    )
    args = ap.parse_args()
    if args.framing == "confluent" and not args.registry:
        ap.error("--framing confluent needs --registry")
    if args.customers < 1 or args.seconds < 1:
        ap.error("--customers and --seconds must be at least 1")
    if not 0 <= args.duplicates_percent <= 100:
        ap.error("--duplicates-percent must be within 0..100")
    for bad in (",", "\n"):
        if bad in args.agent_id or bad in args.region:
            ap.error("--agent-id and --region must not contain commas or newlines (ledger CSV)")

    catalog = ic.load_catalog(args.catalog)
    for svc, ut, unit in USAGE_TYPES:
        entry = catalog.get((svc, ut))
        if entry is None:
            ic.eprint(f"error: {svc}/{ut} is not in {args.catalog}")
            return 2
        if entry.get("base_unit") != unit:
            ic.eprint(f"error: {svc}/{ut} has base_unit {entry.get('base_unit')!r} in the catalog, expected {unit!r}")
            return 2

    schema = ic.load_schema(args.schema)
    if args.framing == "single-object":
        header = ic.SINGLE_OBJECT_MAGIC + ic.fingerprint_bytes(schema)
        parsed = fastavro.parse_schema(schema)

        def encode(ev: dict) -> bytes:
            bio = io.BytesIO()
            bio.write(header)
            fastavro.schemaless_writer(bio, parsed, ev)
            return bio.getvalue()
    else:
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext

        # A request timeout: the client's default is none (see read_topic.py).
        ser = AvroSerializer(SchemaRegistryClient({"url": args.registry, "timeout": ic.REGISTRY_TIMEOUT_S}), json.dumps(schema))
        ctx = SerializationContext(args.topic, MessageField.VALUE)

        def encode(ev: dict) -> bytes:
            return ser(ev, ctx)

    headers = None
    if args.sign:
        key_id, _, secret_hex = args.sign.strip().partition(":")
        secret = bytes.fromhex(secret_hex)

        # The signing recipe (docs/operations.md, "Agent identity"): HMAC-SHA256
        # over the record's value exactly as produced, framing header included.
        def headers(value: bytes) -> list:
            tag = hmac.new(secret, value, hashlib.sha256).hexdigest()
            return [(SIGNATURE_HEADER, f"v1:{key_id}:{tag}".encode("ascii"))]

    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "client.id": "meterline-interop-python",
            "logger": ic.librdkafka_logger(),
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": args.partitioner,
            "linger.ms": 5,
        }
    )

    failures: list[str] = []
    partitions: collections.Counter = collections.Counter()

    def on_delivery(err, msg):
        if err is not None:
            failures.append(f"key {msg.key()!r}: {err}")
        else:
            partitions[msg.partition()] += 1

    def send(key: bytes, value: bytes) -> None:
        while True:
            try:
                if headers is None:
                    producer.produce(args.topic, key=key, value=value, on_delivery=on_delivery)
                else:
                    producer.produce(args.topic, key=key, value=value, headers=headers(value), on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)

    data_rng = random.Random(f"{args.seed}:data")
    dup_rng = random.Random(f"{args.seed}:dup")
    customers = [f"cust-{c:04d}" for c in range(args.customers)]
    seq = {c: args.first_seq - 1 for c in customers}
    stored = {c: data_rng.randrange(1 << 30, 1 << 40) for c in customers}
    recent = {c: collections.deque(maxlen=max(1, args.duplicate_window)) for c in customers}
    ledger: dict[tuple, list[int]] = {}
    events = duplicates = 0
    quantity_total = 0

    try:
        for s in range(args.seconds):
            t = args.start_ms + s * 1000
            for ci, cust in enumerate(customers):
                key = cust.encode("utf-8")
                stored[cust] += data_rng.randrange(0, 1 << 20)
                quantities = {
                    "BoxUsage:m5.large": (1, f"i-{args.agent_id}-{ci:04d}"),
                    "TimedStorage-ByteSec": (stored[cust], f"bucket-{ci:04d}"),
                    "Requests-HTTPS": (data_rng.randint(1, 500), f"dist-{ci:04d}"),
                }
                for svc, ut, _unit in USAGE_TYPES:
                    q, resource = quantities[ut]
                    seq[cust] += 1
                    ev = {
                        "event_id": f"{args.agent_id}:{cust}:{seq[cust]}",
                        "agent_id": args.agent_id,
                        "seq": seq[cust],
                        "customer_id": cust,
                        "service": svc,
                        "usage_type": ut,
                        "resource_id": resource,
                        "region": args.region,
                        "quantity": q,
                        "event_time": t,
                        "attributes": {},
                    }
                    if args.incarnation is not None:
                        ev["incarnation"] = args.incarnation
                    value = encode(ev)
                    send(key, value)
                    events += 1
                    quantity_total += q
                    lk = (t - t % MINUTE_MS, cust, svc, ut, args.region)
                    acc = ledger.setdefault(lk, [0, 0])
                    acc[0] += 1
                    acc[1] += q
                    recent[cust].append(value)
                    if args.duplicates_percent > 0 and dup_rng.random() * 100 < args.duplicates_percent:
                        send(key, dup_rng.choice(list(recent[cust])))
                        duplicates += 1
        deadline = time.monotonic() + args.timeout_s
        while len(producer) > 0 and time.monotonic() < deadline:
            producer.flush(max(0.1, deadline - time.monotonic()))
    except KafkaException as e:
        ic.eprint(f"error: producer: {e}")
        return 2

    left = len(producer)
    delivered = sum(partitions.values())
    if left or failures or delivered != events + duplicates:
        for f in failures[:20]:
            ic.eprint(f"error: delivery failed: {f}")
        ic.eprint(
            f"error: {len(failures)} delivery failures, {left} undelivered after {args.timeout_s} s; "
            f"{delivered} of {events + duplicates} delivered; ledger not written"
        )
        return 1

    write_ledger(args.ledger, ledger)
    print(
        json.dumps(
            {
                "topic": args.topic,
                "framing": args.framing,
                "events": events,
                "duplicates": duplicates,
                "records": events + duplicates,
                "quantity_sum": quantity_total,
                "partitions": {str(p): n for p, n in sorted(partitions.items())},
                "ledger": args.ledger,
                "ledger_keys": len(ledger),
            },
            separators=(",", ":"),
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
