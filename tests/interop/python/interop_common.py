"""Shared helpers of the Python interop tools (fastavro + confluent-kafka only).

Nothing here imports meterline code: the tools read the .avsc files and
schemas/catalog.toml and nothing else of the project.

The JSON rendering below is the read contract shared with the Java tool
(tests/interop/java, Json.java); the two must stay byte-identical:

* compact JSON (no spaces), non-ASCII written as UTF-8, control characters
  escaped as \\n \\r \\t \\b \\f or \\u00xx (lowercase hex);
* record fields in schema order, map keys sorted by their UTF-8 bytes;
* int/long as numbers (timestamp-millis stays a number of milliseconds);
* bytes/fixed with logicalType decimal as a plain decimal string with exactly
  `scale` fraction digits; other bytes/fixed as standard base64;
* enums as their symbol; unions unwrapped (the branch value itself).
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import decimal
import json
import logging
import struct
import sys
from typing import Any

import fastavro
import fastavro.schema

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
CONFLUENT_MAGIC = 0
# Seconds per schema registry request (confluent-kafka retries a timeout).
REGISTRY_TIMEOUT_S = 10

PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
_EPOCH = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)


class DecodeError(Exception):
    """A payload that cannot be decoded; the message says why."""


def eprint(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)


class _OncePerMessage(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def librdkafka_logger() -> logging.Logger:
    """A logger for confluent-kafka's `logger` setting: librdkafka's log lines on
    stderr, each distinct line once (it repeats connection failures every ~50 ms)."""
    log = logging.getLogger("meterline.interop.librdkafka")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("librdkafka: %(message)s"))
        h.addFilter(_OncePerMessage())
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


def load_schema(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def canonical_form(schema: Any) -> str:
    """fastavro's Parsing Canonical Form."""
    return fastavro.schema.to_parsing_canonical_form(schema)


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO straight from the Avro specification (an independent check of fastavro)."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for b in data:
        fp = (fp >> 8) ^ table[(fp ^ b) & 0xFF]
    return fp


def fingerprint_bytes(schema: Any) -> bytes:
    """The 8 bytes of the single-object header: CRC-64-AVRO of the canonical form, little-endian.

    fastavro.schema.fingerprint(..., "CRC-64-AVRO") already returns the hex of the
    little-endian bytes; it is checked against the spec's algorithm here.
    """
    pcf = canonical_form(schema)
    fa = bytes.fromhex(fastavro.schema.fingerprint(pcf, "CRC-64-AVRO"))
    spec = struct.pack("<Q", crc64_avro(pcf.encode("utf-8")))
    if fa != spec:
        raise RuntimeError(f"fastavro CRC-64-AVRO {fa.hex()} != spec algorithm {spec.hex()}")
    return fa


def strip_logical_types(schema: Any) -> Any:
    """A copy without logicalType, so fastavro hands back raw longs and bytes.

    logicalType is not part of the Parsing Canonical Form, so the stripped schema
    has the same fingerprint and the same binary encoding.
    """
    s = copy.deepcopy(schema)

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            x.pop("logicalType", None)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(s)
    return s


# ---------------------------------------------------------------- named types


def _fullname(name: str, namespace: str | None) -> str:
    if "." in name or not namespace:
        return name
    return f"{namespace}.{name}"


def named_types(schema: Any) -> dict[str, dict]:
    """Full name -> definition of every named type in a (raw, unparsed) schema."""
    out: dict[str, dict] = {}

    def walk(s: Any, ns: str | None) -> None:
        if isinstance(s, list):
            for b in s:
                walk(b, ns)
        elif isinstance(s, dict):
            t = s.get("type")
            if t in ("record", "error", "enum", "fixed"):
                full = _fullname(s["name"], s.get("namespace", ns))
                out[full] = s
                inner_ns = full.rsplit(".", 1)[0] if "." in full else None
                for f in s.get("fields", []):
                    walk(f["type"], inner_ns)
            elif t == "array":
                walk(s["items"], ns)
            elif t == "map":
                walk(s["values"], ns)
            elif isinstance(t, (dict, list)):
                walk(t, ns)

    walk(schema, None)
    return out


# ---------------------------------------------------------------- rendering


def format_decimal(unscaled: int, scale: int) -> str:
    sign = "-" if unscaled < 0 else ""
    digits = str(abs(unscaled))
    if scale == 0:
        return sign + digits
    digits = digits.rjust(scale + 1, "0")
    return f"{sign}{digits[:-scale]}.{digits[-scale:]}"


def _decimal_from_bytes(b: bytes, precision: int, scale: int) -> str:
    if len(b) == 0:
        raise DecodeError("decimal with zero-length bytes")
    u = int.from_bytes(b, "big", signed=True)
    digits = len(str(abs(u)))
    if digits > precision:
        raise DecodeError(f"decimal {u} (unscaled) has {digits} digits, more than its precision {precision}")
    return format_decimal(u, scale)


def _decimal_from_decimal(d: decimal.Decimal, precision: int, scale: int) -> str:
    # The confluent AvroDeserializer already applied the logical type. Exact
    # arithmetic: the default context (28 digits) would round 38-digit values.
    ctx = decimal.Context(prec=max(precision, 40) + scale + 2, traps=[decimal.Inexact, decimal.InvalidOperation])
    try:
        u = int(d.scaleb(scale, ctx))
        exact = decimal.Decimal(u).scaleb(-scale, ctx) == d
    except (decimal.Inexact, decimal.InvalidOperation):
        exact = False
    if not exact:
        raise DecodeError(f"decimal {d} is not exact at scale {scale}")
    digits = len(str(abs(u)))
    if digits > precision:
        raise DecodeError(f"decimal {d} has {digits} digits, more than its precision {precision}")
    return format_decimal(u, scale)


class Renderer:
    """Turns fastavro output into the contract's JSON-ready Python values."""

    def __init__(self, schema: Any):
        self.schema = schema
        self.names = named_types(schema)

    def _resolve(self, s: Any, ns: str | None) -> tuple[Any, str | None]:
        if isinstance(s, str) and s not in PRIMITIVES:
            full = _fullname(s, ns)
            d = self.names.get(full) or self.names.get(s)
            if d is None:
                raise DecodeError(f"unknown named type {s}")
            return d, (full.rsplit(".", 1)[0] if "." in full else None)
        if isinstance(s, dict) and isinstance(s.get("type"), (dict, list)) and "logicalType" not in s:
            return self._resolve(s["type"], ns)
        if isinstance(s, dict) and isinstance(s.get("type"), str) and s["type"] not in PRIMITIVES and s["type"] not in (
            "record", "error", "enum", "fixed", "array", "map"
        ):
            return self._resolve(s["type"], ns)
        if isinstance(s, dict) and s.get("type") in ("record", "error", "enum", "fixed"):
            full = _fullname(s["name"], s.get("namespace", ns))
            return s, (full.rsplit(".", 1)[0] if "." in full else None)
        return s, ns

    def render(self, value: Any) -> Any:
        return self._render(value, self.schema, None)

    def _matches(self, value: Any, s: Any, ns: str | None) -> bool:
        s, ns = self._resolve(s, ns)
        if isinstance(s, list):
            return any(self._matches(value, b, ns) for b in s)
        t = s if isinstance(s, str) else s.get("type")
        lt = s.get("logicalType") if isinstance(s, dict) else None
        if t == "null":
            return value is None
        if t == "boolean":
            return isinstance(value, bool)
        if t in ("int", "long"):
            if lt in ("timestamp-millis", "timestamp-micros", "local-timestamp-millis") and isinstance(value, _dt.datetime):
                return True
            return isinstance(value, int) and not isinstance(value, bool)
        if t in ("float", "double"):
            return isinstance(value, float)
        if t == "string":
            return isinstance(value, str)
        if t == "enum":
            return isinstance(value, str) and value in s["symbols"]
        if t in ("bytes", "fixed"):
            if lt == "decimal" and isinstance(value, decimal.Decimal):
                return True
            return isinstance(value, (bytes, bytearray)) and (t == "bytes" or len(value) == s["size"])
        if t == "array":
            return isinstance(value, list)
        if t in ("map", "record", "error"):
            return isinstance(value, dict)
        return False

    def _render(self, value: Any, s: Any, ns: str | None) -> Any:
        if isinstance(s, list):
            for branch in s:
                if self._matches(value, branch, ns):
                    return self._render(value, branch, ns)
            raise DecodeError(f"value {value!r} matches no branch of union {s}")
        s, ns = self._resolve(s, ns)
        if isinstance(s, list):
            return self._render(value, s, ns)
        t = s if isinstance(s, str) else s.get("type")
        lt = s.get("logicalType") if isinstance(s, dict) else None
        if t in ("null", "boolean", "string", "enum", "float", "double"):
            return value
        if t in ("int", "long"):
            if isinstance(value, _dt.datetime):
                if lt == "timestamp-millis":
                    return (value - _EPOCH) // _dt.timedelta(milliseconds=1)
                if lt == "timestamp-micros":
                    return (value - _EPOCH) // _dt.timedelta(microseconds=1)
                raise DecodeError(f"unexpected datetime for {lt}")
            return value
        if t in ("bytes", "fixed"):
            if lt == "decimal":
                precision, scale = int(s["precision"]), int(s.get("scale", 0))
                if isinstance(value, decimal.Decimal):
                    return _decimal_from_decimal(value, precision, scale)
                return _decimal_from_bytes(bytes(value), precision, scale)
            return base64.b64encode(bytes(value)).decode("ascii")
        if t == "array":
            return [self._render(v, s["items"], ns) for v in value]
        if t == "map":
            return {k: self._render(value[k], s["values"], ns) for k in sorted(value, key=lambda k: k.encode("utf-8"))}
        if t in ("record", "error"):
            out = {}
            for f in s["fields"]:
                if f["name"] not in value:
                    raise DecodeError(f"record {s['name']} lacks field {f['name']}")
                out[f["name"]] = self._render(value[f["name"]], f["type"], ns)
            return out
        raise DecodeError(f"unsupported schema {s!r}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------- catalog


def load_catalog(path: str) -> dict[tuple[str, str], dict]:
    """(service, usage_type) -> the catalog's usage_type table."""
    import tomllib

    with open(path, "rb") as f:
        cat = tomllib.load(f)
    return {(u["service"], u["name"]): u for u in cat.get("usage_type", [])}
