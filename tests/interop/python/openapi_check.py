#!/usr/bin/env python3
"""Check a live `meter serve` against its OpenAPI document.

An independent implementation of the contract: openapi-spec-validator checks
the document itself (OpenAPI 3.1), openapi-core validates every request this
tool means to be valid and every response the server gives, and the HTTP
client is the standard library's http.client. Nothing here imports meterline
code; the tool reads the document and talks to the server, nothing else.

    python3 tests/interop/python/openapi_check.py \
        --doc schemas/openapi/meter-serve.yaml --base http://127.0.0.1:PORT \
        --ingest-token TOK --query-token TOK --admin-token TOK \
        --customer CUST --other-customer CUST2 --month YYYY-MM \
        --usage-from 2026-11-01 --usage-to 2026-11-03

    python3 tests/interop/python/openapi_check.py --doc ... --doc-only

The checks are the table in `build_checks`: one request each, the status it
must answer, and what else its response must show. Every response is also
validated against the document (status documented for the operation, content
type documented, body valid against its schema, documented headers valid) and
a 401 must carry a Bearer `WWW-Authenticate` challenge. Every operation of
the document must be exercised by some check: the set is read from the
document, so a route added to it without a check fails the run.

Prints `openapi: N operations, M responses checked, 0 failures` and exits 0,
or prints each failure on its own line and exits 1.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import http.client
import io
import json
import sys
import urllib.parse
import uuid
from typing import Any, Callable, Iterable, Optional

import yaml
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_spec_validator import OpenAPIV31SpecValidator
from werkzeug.datastructures import Headers, ImmutableMultiDict

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
EVENT_SOURCE = "/interop/openapi-check"
CE_JSON = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"


# ---- the document ------------------------------------------------------------------


def load_document(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def document_errors(doc: dict) -> list[str]:
    """openapi-spec-validator's findings on the document, as OpenAPI 3.1."""
    errors = []
    for err in OpenAPIV31SpecValidator(doc).iter_errors():
        errors.append(f"document: {err.json_path}: {err.message}")
    return errors


def documented_operations(doc: dict) -> set[tuple[str, str]]:
    """(METHOD, path template) of every operation of the document."""
    return {
        (method.upper(), path)
        for path, item in (doc.get("paths") or {}).items()
        for method in HTTP_METHODS
        if method in item
    }


def _text_loads(value: bytes, **params: str) -> str:
    return value.decode(params.get("charset", "utf-8"))


def _json_loads(value: bytes, **params: str) -> Any:
    return json.loads(value)


def openapi_app(doc: dict) -> OpenAPI:
    """openapi-core over the document (already validated by `document_errors`),
    able to read the document's media types that it has no reader for."""
    config = Config(
        spec_validator_cls=None,
        extra_media_type_deserializers={
            CE_JSON: _json_loads,
            CE_BATCH: _json_loads,
            "text/csv": _text_loads,
            "application/yaml": _text_loads,
        },
    )
    return OpenAPI.from_dict(doc, config=config)


# ---- one HTTP exchange -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
    """One request: an operation of the document and what is sent to it."""

    method: str
    template: str
    path_params: dict = dataclasses.field(default_factory=dict)
    query: tuple = ()
    token: Optional[str] = None
    content_type: Optional[str] = None
    body: Optional[bytes] = None

    @property
    def operation(self) -> tuple[str, str]:
        return (self.method, self.template)

    def path(self, quote: bool) -> str:
        enc = (lambda v: urllib.parse.quote(v, safe="")) if quote else (lambda v: v)
        return self.template.format(**{k: enc(v) for k, v in self.path_params.items()})

    def headers(self) -> dict[str, str]:
        h = {"Accept": "*/*"}
        if self.token is not None:
            h["Authorization"] = f"Bearer {self.token}"
        if self.content_type is not None:
            h["Content-Type"] = self.content_type
        return h


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    headers: Headers
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def json(self) -> Any:
        return json.loads(self.body)


class ApiRequest:
    """A Call in openapi-core's Request protocol. `host_url` is the document's
    server, not the one under test: openapi-core matches servers exactly, and
    the port a test runs the server on is its own business."""

    def __init__(self, call: Call, host_url: str):
        self.host_url = host_url
        self.path = call.path(quote=False)
        self.method = call.method.lower()
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(list(call.query)), header=Headers(call.headers())
        )
        self.content_type = (call.content_type or "").lower()
        self.body = call.body


class ApiResponse:
    """A Reply in openapi-core's Response protocol."""

    def __init__(self, reply: Reply):
        self.status_code = reply.status
        self.headers = reply.headers
        self.content_type = reply.content_type.lower()
        self.data = reply.body


def send(base: str, call: Call, timeout: float) -> Reply:
    """Send the call to the server under `base` (http://host:port) and read the
    whole answer. A server may answer (413) and close before it has read all of
    a large body: a failed send is then followed by reading that answer."""
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    target = url.path.rstrip("/") + call.path(quote=True)
    if call.query:
        target += "?" + urllib.parse.urlencode(call.query)
    try:
        try:
            conn.request(call.method, target, body=call.body, headers=call.headers())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the answer, if any, is read below
        resp = conn.getresponse()
        body = resp.read()
        return Reply(resp.status, Headers(list(resp.getheaders())), body)
    finally:
        conn.close()


# ---- validation --------------------------------------------------------------------


def describe(exc: BaseException, limit: int = 300) -> str:
    """An openapi-core error, the errors behind it and their schema errors, each
    cut to `limit` characters (some quote the whole value)."""
    parts = [type(exc).__name__]
    cause: Optional[BaseException] = exc
    while cause is not None:
        schema_errors = list(getattr(cause, "schema_errors", None) or ())
        if schema_errors:
            parts += [f"{getattr(e, 'json_path', '$')}: {getattr(e, 'message', e)}"[:limit] for e in schema_errors]
            break
        text = str(cause)
        if cause.__cause__ is not None:  # told next: not twice
            text = text.replace(str(cause.__cause__), "").rstrip(": ")
        if text and text != type(cause).__name__:
            parts.append(text[:limit])
        cause = cause.__cause__
    return "; ".join(parts)


def request_problems(api: OpenAPI, call: Call, host_url: str) -> list[str]:
    return [f"request: {describe(e)}" for e in api.iter_request_errors(ApiRequest(call, host_url))]


def response_problems(api: OpenAPI, call: Call, reply: Reply, host_url: str) -> list[str]:
    """Where the reply departs from the document for this call's operation."""
    problems = [
        f"response {reply.status}: {describe(e)}"
        for e in api.iter_response_errors(ApiRequest(call, host_url), ApiResponse(reply))
    ]
    if reply.status == 401:
        challenge = reply.headers.get("WWW-Authenticate")
        if challenge is None:
            problems.append("response 401: no WWW-Authenticate header")
        elif not challenge.lower().startswith("bearer"):
            problems.append(f"response 401: WWW-Authenticate is not a Bearer challenge: {challenge!r}")
    return problems


# ---- expectations on a reply beyond the document -----------------------------------

Expect = Callable[[Reply], list[str]]


def _json_body(reply: Reply) -> tuple[Any, list[str]]:
    try:
        return reply.json(), []
    except ValueError as e:
        return None, [f"body is not JSON: {e}"]


def error_code(code: str, reason: Optional[str] = None) -> Expect:
    """An Error body with this `error` (and an event refused for `reason`)."""

    def check(reply: Reply) -> list[str]:
        body, bad = _json_body(reply)
        if bad:
            return bad
        got = body.get("error") if isinstance(body, dict) else None
        out = [] if got == code else [f"error is {got!r}, expected {code!r}"]
        if reason is not None:
            reasons = [e.get("reason") for e in body.get("events") or []]
            if reason not in reasons:
                out.append(f"events[].reason {reasons!r} lacks {reason!r}")
        return out

    return check


def fields(**expected: Any) -> Expect:
    """A JSON object with these top-level values."""

    def check(reply: Reply) -> list[str]:
        body, bad = _json_body(reply)
        if bad:
            return bad
        if not isinstance(body, dict):
            return ["body is not a JSON object"]
        return [
            f"{k} is {body.get(k)!r}, expected {v!r}" for k, v in expected.items() if body.get(k) != v
        ]

    return check


def non_empty(key: str) -> Expect:
    def check(reply: Reply) -> list[str]:
        body, bad = _json_body(reply)
        if bad:
            return bad
        return [] if isinstance(body, dict) and body.get(key) else [f"{key} is empty"]

    return check


def csv_header(column: str) -> Expect:
    def check(reply: Reply) -> list[str]:
        out = []
        if not reply.content_type.lower().startswith("text/csv"):
            out.append(f"content type is {reply.content_type!r}, expected text/csv")
        try:
            header = next(csv.reader(io.StringIO(reply.body.decode("utf-8"))), [])
        except UnicodeDecodeError as e:
            return out + [f"body is not UTF-8: {e}"]
        if column not in header:
            out.append(f"first line {header!r} has no {column!r} column")
        return out

    return check


def same_document(doc: dict) -> Expect:
    def check(reply: Reply) -> list[str]:
        try:
            served = yaml.safe_load(reply.body)
        except yaml.YAMLError as e:
            return [f"body is not YAML: {e}"]
        return [] if served == doc else ["the served document differs from --doc"]

    return check


# ---- the checks --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    call: Call
    status: int
    # "valid": openapi-core must accept the request; "invalid": it must refuse
    # it (the case is outside the document); None: not validated (the document
    # cannot tell, or the body is too large to be worth it).
    request: Optional[str] = "valid"
    expect: tuple = ()


def rfc3339_ms(t: _dt.datetime) -> str:
    return t.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Events:
    """CloudEvents with ids unique to this run."""

    def __init__(self, event_type: str):
        self.event_type = event_type
        self.run = uuid.uuid4().hex
        self.n = 0
        self.time = rfc3339_ms(_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=10))

    def event(self, subject: str, event_type: Optional[str] = None) -> dict:
        self.n += 1
        return {
            "specversion": "1.0",
            "id": f"{self.run}-{self.n}",
            "source": EVENT_SOURCE,
            "type": event_type or self.event_type,
            "subject": subject,
            "time": self.time,
            "datacontenttype": "application/json",
            "data": {"quantity": 1, "resource": "i-openapi", "region": "us-east-1"},
        }


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def oversized_batch(event: dict, size: int) -> bytes:
    """A batch of one event padded with whitespace to exactly `size` bytes."""
    head = b"[" + _json(event)
    if size < len(head) + 1:
        raise ValueError(f"--max-body-bytes {size - 1} is smaller than one event")
    return head + b" " * (size - len(head) - 1) + b"]"


def build_checks(args: argparse.Namespace, doc: dict) -> list[Check]:
    ev = Events(args.event_type)
    cust, other = args.customer, args.other_customer
    ingest, query, admin = args.ingest_token, args.query_token, args.admin_token

    def post(token: Optional[str], body: bytes, content_type: str = CE_JSON) -> Call:
        return Call("POST", "/v1/events", token=token, content_type=content_type, body=body)

    def usage(token: Optional[str], customer: str, **extra: str) -> Call:
        q = {"customer": customer, "from": args.usage_from, "to": args.usage_to}
        q.update(extra)
        return Call("GET", "/v1/usage", query=tuple(q.items()), token=token)

    def customer_get(template: str, token: str, customer: str, **params: str) -> Call:
        return Call("GET", template, path_params={"customer": customer, **params}, token=token)

    cost = "/v1/customers/{customer}/cost"
    invoice = "/v1/customers/{customer}/invoices/{month}"
    lines = "/v1/customers/{customer}/invoices/{month}/lines"
    group = {"window": "day", "group_by": "service,usage_type"}

    return [
        # POST /v1/events
        Check("events: one structured event", post(ingest, _json(ev.event(cust))), 202,
              expect=(fields(accepted=1),)),
        Check("events: a batch of two", post(ingest, _json([ev.event(cust), ev.event(cust)]), CE_BATCH), 202,
              expect=(fields(accepted=2),)),
        Check("events: malformed JSON", post(ingest, b'{"specversion": "1.0", '), 400, "invalid",
              (error_code("malformed_json"),)),
        Check("events: unknown usage type", post(ingest, _json(ev.event(cust, "compute/NoSuchType"))), 400,
              expect=(error_code("invalid_events", "unknown_usage_type"),)),
        Check("events: no token", post(None, _json(ev.event(cust))), 401, "invalid",
              (error_code("unauthorized"),)),
        Check("events: a token that is no key", post(f"no-such-key-{ev.run}", _json(ev.event(cust))), 401,
              expect=(error_code("unauthorized"),)),
        Check("events: ingest key for another customer", post(ingest, _json(ev.event(other))), 403,
              expect=(error_code("forbidden"),)),
        Check("events: a query key posting", post(query, _json(ev.event(cust))), 403,
              expect=(error_code("forbidden"),)),
        Check("events: body over max_body_bytes",
              post(ingest, oversized_batch(ev.event(cust), args.max_body_bytes + 1), CE_BATCH), 413, None,
              (error_code("too_large"),)),
        Check("events: text/plain", post(ingest, _json(ev.event(cust)), "text/plain"), 415, "invalid",
              (error_code("unsupported_media_type"),)),
        # GET /v1/usage
        Check("usage: JSON by day", usage(query, cust, **group), 200,
              expect=(fields(customer=cust, window="day", group_by=["service", "usage_type"]), non_empty("rows"))),
        Check("usage: CSV", usage(query, cust, **group, format="csv"), 200, expect=(csv_header("window_start"),)),
        Check("usage: admin key", usage(admin, cust), 200, expect=(fields(customer=cust),)),
        Check("usage: window=week", usage(query, cust, window="week"), 400, "invalid", (error_code("bad_request"),)),
        Check("usage: no token", usage(None, cust), 401, "invalid", (error_code("unauthorized"),)),
        Check("usage: query key for another customer", usage(query, other), 403, expect=(error_code("forbidden"),)),
        # GET /v1/customers/{customer}/cost
        Check("cost: query key", customer_get(cost, query, cust), 200, expect=(fields(customer=cust),)),
        Check("cost: admin key", customer_get(cost, admin, cust), 200, expect=(fields(customer=cust),)),
        Check("cost: query key for another customer", customer_get(cost, query, other), 403,
              expect=(error_code("forbidden"),)),
        # GET /v1/customers/{customer}/invoices/{month}
        Check("invoice: stored month", customer_get(invoice, query, cust, month=args.month), 200,
              expect=(fields(customer=cust, month=args.month),)),
        Check("invoice: month without an invoice", customer_get(invoice, query, cust, month="1999-01"), 404,
              expect=(error_code("not_found"),)),
        Check("invoice: month 2026-13", customer_get(invoice, query, cust, month="2026-13"), 400,
              expect=(error_code("bad_request"),)),
        Check("invoice: query key for another customer", customer_get(invoice, query, other, month=args.month),
              403, expect=(error_code("forbidden"),)),
        # GET /v1/customers/{customer}/invoices/{month}/lines
        Check("invoice lines: admin key", customer_get(lines, admin, cust, month=args.month), 200,
              expect=(fields(customer=cust, month=args.month),)),
        # GET /v1/openapi.yaml
        Check("openapi.yaml: no token", Call("GET", "/v1/openapi.yaml"), 200,
              expect=(same_document(doc),)),
    ]


# ---- running them ------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    responses: int = 0
    failures: list = dataclasses.field(default_factory=list)


def run_check(api: OpenAPI, host_url: str, base: str, timeout: float, check: Check) -> tuple[bool, list[str]]:
    """(got a response, problems) of one check."""
    problems: list[str] = []
    if check.request is not None:
        errors = request_problems(api, check.call, host_url)
        if check.request == "valid":
            problems += errors
        elif not errors:
            problems.append("request: the document accepts this request, expected it to refuse it")
    try:
        reply = send(base, check.call, timeout)
    except (OSError, http.client.HTTPException) as e:
        return False, problems + [f"no response: {type(e).__name__}: {e}"]
    if reply.status != check.status:
        problems.append(f"status {reply.status}, expected {check.status}: {reply.body[:300]!r}")
    problems += response_problems(api, check.call, reply, host_url)
    if reply.status == check.status:
        for expect in check.expect:
            problems += expect(reply)
    return True, problems


def unexercised(doc: dict, checks: Iterable[Check]) -> list[str]:
    done = {c.call.operation for c in checks}
    return [f"{m} {p}: no check exercises this operation" for m, p in sorted(documented_operations(doc) - done)]


def run(api: OpenAPI, doc: dict, base: str, timeout: float, checks: list[Check]) -> Outcome:
    host_url = doc["servers"][0]["url"].rstrip("/") if doc.get("servers") else base
    outcome = Outcome(failures=unexercised(doc, checks))
    for check in checks:
        answered, problems = run_check(api, host_url, base, timeout, check)
        outcome.responses += answered
        outcome.failures += [f"{check.name} ({check.call.method} {check.call.template}): {p}" for p in problems]
    return outcome


# ---- command line ------------------------------------------------------------------

SERVER_ARGS = ("base", "ingest_token", "query_token", "admin_token", "customer", "other_customer",
               "month", "usage_from", "usage_to")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--doc", required=True, help="the OpenAPI document (YAML)")
    p.add_argument("--doc-only", action="store_true", help="only validate the document")
    p.add_argument("--base", help="the server, http://HOST:PORT")
    p.add_argument("--ingest-token", help="an ingest key for --customer only")
    p.add_argument("--query-token", help="a query key for --customer only")
    p.add_argument("--admin-token", help="an admin key")
    p.add_argument("--customer", help="a customer with usage and a stored invoice")
    p.add_argument("--other-customer", help="a customer the ingest and query keys are not for")
    p.add_argument("--month", help="YYYY-MM with a stored invoice for --customer")
    p.add_argument("--usage-from", help="start of a span with usage for --customer")
    p.add_argument("--usage-to", help="end of that span (exclusive)")
    p.add_argument("--event-type", default="compute/BoxUsage:m5.large", help="a usage type of the catalog")
    p.add_argument("--max-body-bytes", type=int, default=4194304, help="the server's serve.max_body_bytes")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    args = p.parse_args(argv)
    if not args.doc_only:
        missing = ["--" + a.replace("_", "-") for a in SERVER_ARGS if getattr(args, a) is None]
        if missing:
            p.error("required unless --doc-only: " + " ".join(missing))
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    doc = load_document(args.doc)
    errors = document_errors(doc)
    if errors:
        print("\n".join(errors))
        return 1
    if args.doc_only:
        print("openapi: document valid")
        return 0
    checks = build_checks(args, doc)
    outcome = run(openapi_app(doc), doc, args.base, args.timeout, checks)
    if outcome.failures:
        print("\n".join(outcome.failures))
        print(f"openapi: {len(documented_operations(doc))} operations, "
              f"{outcome.responses} responses checked, {len(outcome.failures)} failures")
        return 1
    print(f"openapi: {len(documented_operations(doc))} operations, {outcome.responses} responses checked, 0 failures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
