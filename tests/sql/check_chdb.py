#!/usr/bin/env python3
"""Apply a directory of ClickHouse migrations to a throw-away chDB session.

Usage:
    python3 tests/sql/check_chdb.py DIR [--db NAME]

Every ``DIR/*.sql`` file is applied in lexical order to a fresh chDB session
(in a temporary directory). A file may hold several statements separated by
``;``; semicolons inside quoted strings, quoted identifiers and ``--`` / ``/* */``
comments are not separators. The placeholder ``{db}`` is replaced with the
database name (default ``meterline_chdb``). Then ``SELECT count()`` runs against
every table the files created.

Prints ``chdb: ok (N files, M statements, ClickHouse <version>)`` and exits 0,
or prints the failing file/statement and the error and exits 1.
Exits 2 when chdb is not importable (install it with ``ops/install``).

Note: chDB embeds a current ClickHouse (26.x). It accepts SQL that the old
Debian clickhouse-server 18.16 rejects, so this checks syntax/semantics against
modern ClickHouse only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

DEFAULT_DB = "meterline_chdb"
# engines whose SELECT would reach out to external systems
SKIP_COUNT_ENGINES = {"Kafka", "RabbitMQ", "NATS", "Distributed", "MySQL", "PostgreSQL",
                      "URL", "S3", "HDFS", "MongoDB", "Redis", "Dictionary"}
SYSTEM_DATABASES = ("system", "INFORMATION_SCHEMA", "information_schema")


def split_statements(sql: str) -> list[str]:
    """Split SQL text into statements at top-level ';'.

    Understands '...' strings (with backslash escapes and '' doubling),
    "..." and `...` quoted identifiers, -- line comments and /* */ block
    comments. Statements consisting only of comments/whitespace are dropped.
    """
    statements: list[str] = []
    buf: list[str] = []
    has_code = False  # current statement has something besides comments
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        nxt = sql[i + 1] if i + 1 < n else ""
        if c == "-" and nxt == "-":
            j = sql.find("\n", i)
            j = n if j == -1 else j
            buf.append(sql[i:j])
            i = j
            continue
        if c == "/" and nxt == "*":
            j = sql.find("*/", i + 2)
            j = n if j == -1 else j + 2
            buf.append(sql[i:j])
            i = j
            continue
        if c in ("'", '"', "`"):
            j = i + 1
            while j < n:
                if sql[j] == "\\":
                    j += 2
                    continue
                if sql[j] == c:
                    if j + 1 < n and sql[j + 1] == c:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            j = min(j + 1, n)
            buf.append(sql[i:j])
            has_code = True
            i = j
            continue
        if c == ";":
            if has_code:
                statements.append("".join(buf).strip())
            buf, has_code = [], False
            i += 1
            continue
        if not c.isspace():
            has_code = True
        buf.append(c)
        i += 1
    if has_code:
        statements.append("".join(buf).strip())
    return statements


def first_line(text: str, limit: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + " ..."


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="directory with *.sql files")
    ap.add_argument("--db", default=DEFAULT_DB, help=f"value for {{db}} (default {DEFAULT_DB})")
    args = ap.parse_args(argv)

    try:
        import chdb  # noqa: F401
        from chdb import session as chdb_session
    except Exception as e:  # ImportError, or a broken native library
        print(f"chdb: not importable ({type(e).__name__}: {e}); run ops/install "
              f"(or: python3 -m pip install chdb)", file=sys.stderr)
        return 2

    if not args.dir.is_dir():
        print(f"chdb: {args.dir} is not a directory", file=sys.stderr)
        return 1
    files = sorted(p for p in args.dir.glob("*.sql") if p.is_file())
    if not files:
        print(f"chdb: no *.sql files in {args.dir}", file=sys.stderr)
        return 1

    tmp = tempfile.mkdtemp(prefix="meterline-chdb-")
    sess = chdb_session.Session(tmp)
    # `meter migrate` creates the database before applying the files.
    sess.query(f"CREATE DATABASE IF NOT EXISTS {args.db}")
    n_statements = 0
    try:
        for path in files:
            text = path.read_text(encoding="utf-8").replace("{db}", args.db)
            for idx, stmt in enumerate(split_statements(text), start=1):
                n_statements += 1
                try:
                    sess.query(stmt, "CSV")
                except Exception as e:
                    print(f"chdb: FAILED {path.name} statement #{idx}:\n"
                          f"{first_line(stmt)}\n--- error ---\n{first_line(str(e))}",
                          file=sys.stderr)
                    return 1

        tables = str(sess.query(
            "SELECT database, name, engine FROM system.tables WHERE database NOT IN "
            f"({', '.join(repr(d) for d in SYSTEM_DATABASES)}) "
            "AND NOT is_temporary ORDER BY database, name",
            "TSV")).splitlines()
        n_tables = 0
        for line in tables:
            if not line.strip():
                continue
            database, name, engine = line.split("\t")
            if engine in SKIP_COUNT_ENGINES:
                continue
            q = f"SELECT count() FROM `{database}`.`{name}`"
            try:
                sess.query(q, "CSV")
            except Exception as e:
                print(f"chdb: FAILED smoke query {q}\n--- error ---\n{first_line(str(e))}",
                      file=sys.stderr)
                return 1
            n_tables += 1

        version = str(sess.query("SELECT version()", "TSV")).strip()
    finally:
        try:
            sess.close()
        except Exception:
            pass
        shutil.rmtree(tmp, ignore_errors=True)

    if not n_tables:
        print("chdb: note: the files created no tables", file=sys.stderr)
    print(f"chdb: ok ({len(files)} files, {n_statements} statements, ClickHouse {version})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
