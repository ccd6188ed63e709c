#!/usr/bin/env python3
"""Sums usage.aggregates (the JSON lines of read_topic.py or of the Java `read`)
into meterline's CSV ledger format, to diff against the producer's ledger.

    read_topic.py --topic usage.aggregates --schema schemas/avro/aggregated_usage.avsc ... \\
        | sum_aggregates.py [--granularity MINUTE|HOUR|DAY] [--final-only] [-o OUT.csv] [FILE...]

The topic is a changelog: for each window key (granularity, window_start,
customer_id, service, usage_type, region, resource_id) the record with the
highest revision wins. The winners of the chosen granularity (MINUTE by default)
are then summed over resource_id per ledger key and printed as

    customer_id,service,usage_type,region,minute_start_ms,event_count,quantity_sum

sorted like Rust's Ledger::to_csv (window_start, then the strings). For HOUR or
DAY the fifth column holds that window's start (the header stays the same).

Two records of one window key with the same revision but different contents are
a conflict: reported on stderr, exit 1. Malformed input lines: exit 2.
--final-only keeps only window keys whose winning revision has is_final = true.
"""

from __future__ import annotations

import argparse
import fileinput
import json
import os
import sys

LEDGER_HEADER = "customer_id,service,usage_type,region,minute_start_ms,event_count,quantity_sum"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--granularity", choices=["MINUTE", "HOUR", "DAY"], default="MINUTE")
    ap.add_argument("--final-only", action="store_true")
    ap.add_argument("-o", "--output", help="write the CSV here instead of stdout")
    ap.add_argument("files", nargs="*", help="JSON lines (default stdin)")
    args = ap.parse_args()

    best: dict[tuple, dict] = {}
    conflicts = 0
    n = 0
    for line in fileinput.input(args.files or ["-"], encoding="utf-8"):
        line = line.strip()
        if not line:
            continue
        n += 1
        try:
            rec = json.loads(line)
            v = rec["value"]
            if v is None:
                continue  # tombstone: not part of the changelog contract
            key = (
                v["granularity"], int(v["window_start"]), v["customer_id"], v["service"],
                v["usage_type"], v["region"], v["resource_id"],
            )
            rev = int(v["revision"])
            int(v["quantity_sum"])  # scale 0: must be an integer string
        except (ValueError, KeyError, TypeError) as e:
            print(f"error: input line {n}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        cur = best.get(key)
        if cur is None or rev > int(cur["revision"]):
            best[key] = v
        elif rev == int(cur["revision"]) and cur != v:
            print(f"error: window {key} has two different records with revision {rev}", file=sys.stderr)
            conflicts += 1

    totals: dict[tuple, list[int]] = {}
    for (gran, ws, cust, svc, ut, region, _res), v in best.items():
        if gran != args.granularity or (args.final_only and not v["is_final"]):
            continue
        acc = totals.setdefault((ws, cust, svc, ut, region), [0, 0])
        acc[0] += int(v["event_count"])
        acc[1] += int(v["quantity_sum"])

    out_lines = [LEDGER_HEADER]
    for (ws, cust, svc, ut, region), (count, qsum) in sorted(totals.items()):
        out_lines.append(f"{cust},{svc},{ut},{region},{ws},{count},{qsum}")
    text = "\n".join(out_lines) + "\n"
    if args.output:
        tmp = f"{args.output}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, args.output)
    else:
        sys.stdout.write(text)
    print(
        f"{n} records, {len(best)} window keys, {len(totals)} {args.granularity} ledger keys, {conflicts} conflicts",
        file=sys.stderr,
    )
    return 1 if conflicts else 0


if __name__ == "__main__":
    sys.exit(main())
