#!/usr/bin/env python3
"""Prints '<file> <16 hex>' per .avsc file: the 8 bytes of the Avro single-object
header (CRC-64-AVRO of the Parsing Canonical Form, little-endian), computed with
fastavro and checked against the spec's CRC algorithm and against the header that
an encode with fastavro + the header actually produces.

    fingerprint.py [--canonical] FILE.avsc...

--canonical also prints, after each line, fastavro's canonical form (indented by
two spaces) so it can be diffed against `java -jar meterline-interop.jar canonical`.
Exit 0 on success, 1 on any mismatch, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastavro  # noqa: E402

import interop_common as ic  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canonical", action="store_true", help="also print the canonical form")
    ap.add_argument("files", nargs="+", metavar="FILE.avsc")
    args = ap.parse_args()
    rc = 0
    for f in args.files:
        try:
            schema = ic.load_schema(f)
            fp = ic.fingerprint_bytes(schema)
            parsed = fastavro.parse_schema(ic.strip_logical_types(schema))
            # Round trip of a header + body, as a reader would see it.
            sample = _sample(schema, ic.named_types(schema), None)
            bio = io.BytesIO()
            fastavro.schemaless_writer(bio, parsed, sample)
            msg = ic.SINGLE_OBJECT_MAGIC + fp + bio.getvalue()
            back = fastavro.schemaless_reader(io.BytesIO(msg[10:]), parsed)
            if msg[2:10] != fp or back != sample:
                ic.eprint(f"error: {f}: single-object round trip failed")
                rc = 1
                continue
        except Exception as e:  # noqa: BLE001
            ic.eprint(f"error: {f}: {e}")
            rc = 1
            continue
        print(f"{f} {fp.hex()}")
        if args.canonical:
            print("  " + ic.canonical_form(schema))
    return rc


def _sample(s, names, ns):
    """A value of any (raw) schema, mirroring Main.sample in the Java tool."""
    if isinstance(s, list):
        return _sample(s[0], names, ns)
    if isinstance(s, str):
        if s in ic.PRIMITIVES:
            return {"null": None, "boolean": True, "int": 1, "long": 1, "float": 1.0, "double": 1.0,
                    "bytes": b"\x01", "string": "x"}[s]
        return _sample(names.get(ic._fullname(s, ns)) or names[s], names, ns)
    t = s["type"]
    if isinstance(t, (dict, list)):
        return _sample(t, names, ns)
    if t == "record" or t == "error":
        full = ic._fullname(s["name"], s.get("namespace", ns))
        inner = full.rsplit(".", 1)[0] if "." in full else None
        return {f["name"]: _sample(f["type"], names, inner) for f in s["fields"]}
    if t == "enum":
        return s["symbols"][0]
    if t == "array":
        return []
    if t == "map":
        return {}
    if t == "fixed":
        return b"\x00" * s["size"]
    return _sample(t, names, ns)


if __name__ == "__main__":
    sys.exit(main())
