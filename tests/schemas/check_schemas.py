#!/usr/bin/env python3
"""Checks the documents under schemas/ with real validators.

  check_schemas.py static <cqrs-commandd> <cqrs-queryd>
      the OpenAPI document is valid OpenAPI 3.1 (openapi-spec-validator, external $refs
      resolved); every JSON Schema is a valid 2020-12 schema; the OpenAPI paths are exactly the
      routes the daemon serves (`--routes`); the test data's valid CreateProduct bodies pass the
      command schema.
  check_schemas.py events
      every domain event (products, orders; the integration tests add other types) in the
      PostgreSQL event log (CQRS_PG_DSN, read with psql) validates against
      schemas/events/<type>.json, and every event type has a schema.
"""
import json
import os
import pathlib
import subprocess
import sys

import yaml
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from openapi_spec_validator.readers import read_from_filename

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMAS = ROOT / "schemas"
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def check_openapi(doc, daemon):
    path = SCHEMAS / "openapi" / doc
    spec, base_uri = read_from_filename(str(path))
    validate(spec, base_uri=base_uri)
    print(f"ok: {doc} is valid OpenAPI 3.1")
    documented = {(m.upper(), p) for p, item in spec["paths"].items() for m in item
                  if m in ("get", "put", "post", "patch", "delete")}
    out = subprocess.run([daemon, "--routes"], check=True, capture_output=True, text=True).stdout
    served = {tuple(line.split(" ", 1)) for line in out.splitlines() if line.strip()}
    for missing in sorted(served - documented):
        fail(f"{doc}: route {missing} is served but not documented")
    for extra in sorted(documented - served):
        fail(f"{doc}: {extra} is documented but not served")
    print(f"ok: {doc} documents the {len(served)} routes of {pathlib.Path(daemon).name}"
          if served == documented else "")


def static(commandd, queryd):
    for f in sorted((SCHEMAS / "commands").glob("*.json")) + sorted((SCHEMAS / "events").glob("*.json")):
        try:
            Draft202012Validator.check_schema(json.loads(f.read_text()))
        except Exception as e:  # noqa: BLE001 - report every bad schema
            fail(f"{f.name}: {e}")
    print("ok: JSON Schemas are valid 2020-12 schemas")
    check_openapi("command-api.yaml", commandd)
    if (SCHEMAS / "openapi" / "query-api.yaml").exists():
        check_openapi("query-api.yaml", queryd)
    create = Draft202012Validator(json.loads((SCHEMAS / "commands" / "create-product.json").read_text()))
    valid_dir = ROOT / "tests" / "data" / "create_product" / "valid"
    for case in sorted(valid_dir.iterdir()):
        errors = list(create.iter_errors(json.loads((case / "input").read_text())))
        if errors:
            fail(f"valid case {case.name} fails create-product.json: {errors[0].message}")


def events():
    dsn = os.environ.get("CQRS_PG_DSN")
    if not dsn:
        fail("CQRS_PG_DSN is not set")
        return
    out = subprocess.run(["psql", dsn, "-Atqc",
                          "SELECT json_build_object('type', event_type, 'data', data)"
                          " FROM events WHERE aggregate_type IN ('product', 'order')"
                          " ORDER BY sequence"],
                         check=True, capture_output=True, text=True).stdout
    validators, seen, n = {}, {}, 0
    for line in out.splitlines():
        ev = json.loads(line)
        t = ev["type"]
        if t not in validators:
            f = SCHEMAS / "events" / f"{t}.json"
            if not f.exists():
                fail(f"event type {t} has no schema")
                validators[t] = None
                continue
            validators[t] = Draft202012Validator(json.loads(f.read_text()),
                                                 format_checker=Draft202012Validator.FORMAT_CHECKER)
        if validators[t] is None:
            continue
        errs = list(validators[t].iter_errors(ev["data"]))
        if errs and seen.get(t, 0) < 3:
            fail(f"{t}: {errs[0].message} in {json.dumps(ev['data'])[:200]}")
        seen[t] = seen.get(t, 0) + (1 if errs else 0)
        n += 1
    print(f"ok: checked {n} events of {len(validators)} types")
    if n == 0:
        fail("the event log is empty: run the e2e tests first")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "static":
        static(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 2 and sys.argv[1] == "events":
        events()
    else:
        print(__doc__)
        sys.exit(2)
    sys.exit(1 if failures else 0)
