#!/usr/bin/env python3
"""A minimal in-memory Confluent Schema Registry, enough for the confluent framing
of these tools (confluent-kafka's AvroSerializer/AvroDeserializer and the Java
tool's `read`/`produce`). Listens on 127.0.0.1 only.

    mock_registry.py [--port 0]

Prints its base URL (http://127.0.0.1:PORT) as the first line of stdout, then
serves until killed. Endpoints:

  POST /subjects/{subject}/versions   register; the same schema text gets the same id
  POST /subjects/{subject}            look up a registered schema
  GET  /schemas/ids/{id}              {"schema": "..."} (schemaType omitted for AVRO)
  GET  /subjects                      subject names
  GET  /subjects/{subject}/versions   version numbers
  GET  /subjects/{subject}/versions/{n|latest}

Schemas are compared by their JSON (parsed and re-dumped with sorted keys), not
normalised further. Not for production: no compatibility checks, no persistence.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LOCK = threading.Lock()
IDS: dict[str, int] = {}  # normalised schema -> id
SCHEMAS: dict[int, dict] = {}  # id -> {"schema": str, "schemaType": str}
SUBJECTS: dict[str, list[int]] = {}  # subject -> ids by version (1-based)


def _norm(schema: str) -> str:
    try:
        return json.dumps(json.loads(schema), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return schema


class Handler(BaseHTTPRequestHandler):
    server_version = "meterline-mock-registry/1"

    def log_message(self, fmt, *args):  # quiet; errors still go to stderr via send_error
        pass

    def _send(self, code: int, body) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self, code: int, msg: str) -> None:
        self._send(404, {"error_code": code, "message": msg})

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def _version(self, subject: str, version: int, sid: int) -> dict:
        s = SCHEMAS[sid]
        out = {"subject": subject, "version": version, "id": sid, "schema": s["schema"]}
        if s["schemaType"] != "AVRO":
            out["schemaType"] = s["schemaType"]
        return out

    def do_POST(self):  # noqa: N802
        path = urlparse(self.path).path
        m = re.fullmatch(r"/subjects/([^/]+)(/versions)?", path)
        if not m:
            return self._not_found(404, f"no route {path}")
        subject = unquote(m.group(1))
        try:
            body = self._body()
            schema = body["schema"]
        except (ValueError, KeyError):
            return self._send(422, {"error_code": 42201, "message": "invalid schema request"})
        if body.get("references"):
            return self._send(422, {"error_code": 42201, "message": "references are not supported"})
        stype = body.get("schemaType") or "AVRO"
        key = stype + ":" + _norm(schema)
        with LOCK:
            if m.group(2):  # register
                sid = IDS.get(key)
                if sid is None:
                    sid = len(SCHEMAS) + 1
                    IDS[key] = sid
                    SCHEMAS[sid] = {"schema": schema, "schemaType": stype}
                versions = SUBJECTS.setdefault(subject, [])
                if sid not in versions:
                    versions.append(sid)
                return self._send(200, {"id": sid})
            sid = IDS.get(key)
            versions = SUBJECTS.get(subject, [])
            if sid is None or sid not in versions:
                return self._not_found(40403, "Schema not found")
            return self._send(200, self._version(subject, versions.index(sid) + 1, sid))

    def do_GET(self):  # noqa: N802
        path = urlparse(self.path).path
        with LOCK:
            m = re.fullmatch(r"/schemas/ids/(\d+)", path)
            if m:
                s = SCHEMAS.get(int(m.group(1)))
                if s is None:
                    return self._not_found(40403, "Schema not found")
                out = {"schema": s["schema"]}
                if s["schemaType"] != "AVRO":
                    out["schemaType"] = s["schemaType"]
                return self._send(200, out)
            if path == "/subjects":
                return self._send(200, sorted(SUBJECTS))
            m = re.fullmatch(r"/subjects/([^/]+)/versions", path)
            if m:
                subject = unquote(m.group(1))
                if subject not in SUBJECTS:
                    return self._not_found(40401, "Subject not found")
                return self._send(200, list(range(1, len(SUBJECTS[subject]) + 1)))
            m = re.fullmatch(r"/subjects/([^/]+)/versions/(\d+|latest)", path)
            if m:
                subject = unquote(m.group(1))
                versions = SUBJECTS.get(subject)
                if not versions:
                    return self._not_found(40401, "Subject not found")
                v = len(versions) if m.group(2) == "latest" else int(m.group(2))
                if not 1 <= v <= len(versions):
                    return self._not_found(40402, "Version not found")
                return self._send(200, self._version(subject, v, versions[v - 1]))
        return self._not_found(404, f"no route {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = ap.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"http://127.0.0.1:{srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
