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
      schemas/events/<type>.json, and every event type has a schema; then every message of the
      daemons' event topics in Kafka (`<prefix>.product.events`, `<prefix>.order.events`, all
      prefixes: every e2e run's) parses with the CloudEvents Python SDK (binary content mode),
      its data validates against the schema of its type, and each aggregate's `sequence`
      extension values sort as strings in offset order (zero-padded, issue 21). Per aggregate
      (subject), not per partition: a sequence is the event's position in the log, taken at
      insert, and transactions commit — and are published — in another order; an aggregate's
      events are ordered by its row lock, so its sequences grow in publication order.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

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
    # one event a line: split on "\n" only (splitlines() would also cut at U+2028, U+0085, …,
    # which JSON strings may hold unescaped — schemathesis sends them)
    for line in filter(None, out.split("\n")):
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
    kafka_events(validators)


def kafka_conf():
    """The stack's Kafka (CQRS_KAFKA_BROKERS) with the CQRS_KAFKA_PROPERTY_* passthrough of the
    daemons (README, Kafka security: the property's name upper-cased, dots as underscores)."""
    conf = {"bootstrap.servers": os.environ["CQRS_KAFKA_BROKERS"]}
    for k, v in os.environ.items():
        if k.startswith("CQRS_KAFKA_PROPERTY_"):
            conf[k[len("CQRS_KAFKA_PROPERTY_"):].lower().replace("_", ".")] = v
    return conf


def kafka_events(validators):
    import re

    from cloudevents.core.bindings.kafka import KafkaMessage, from_kafka_event
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    from confluent_kafka.admin import AdminClient

    if not os.environ.get("CQRS_KAFKA_BROKERS"):
        fail("CQRS_KAFKA_BROKERS is not set")
        return
    conf = kafka_conf()
    # Not the topics of test_e2e_commands' overflow orders (prefix e2eovf…): that run widens
    # CQRS_LIMIT_PRICE_CENTS and CQRS_LIMIT_QUANTITY on purpose, and the schemas' bounds are the
    # default limits (README, "Limits").
    topics = sorted(t for t in AdminClient(conf).list_topics(timeout=15).topics
                    if re.fullmatch(r"[^.]+\.(product|order)\.events", t) and not t.startswith("e2eovf"))
    consumer = Consumer(dict(conf, **{"group.id": "check-schemas", "enable.auto.commit": False,
                                      "enable.partition.eof": True}))
    n, bad = 0, 0
    last = {}  # (topic, partition, subject) → the aggregate's last sequence value seen there

    def bad_message(msg):
        nonlocal bad
        bad += 1
        if bad <= 5:
            fail(msg)

    try:
        # every partition of every event topic at once, read to its end (EOF events)
        assignment = []
        for topic in topics:
            for part in consumer.list_topics(topic, timeout=15).topics[topic].partitions:
                lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=15)
                if hi > lo:
                    assignment.append(TopicPartition(topic, part, lo))
        consumer.assign(assignment)
        open_parts = {(tp.topic, tp.partition) for tp in assignment}
        deadline = time.time() + 120
        while open_parts and time.time() < deadline:
            msg = consumer.poll(5)
            if msg is None:
                continue
            where = (msg.topic(), msg.partition())
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    open_parts.discard(where)
                else:
                    fail(f"{where}: {msg.error()}")
                    break
                continue
            n += 1
            at = f"{msg.topic()}/{msg.partition()}@{msg.offset()}"
            try:
                ev = from_kafka_event(KafkaMessage(headers=dict(msg.headers() or []),
                                                   key=msg.key(), value=msg.value()))
            except Exception as e:  # noqa: BLE001 - report every message the SDK refuses
                bad_message(f"{at}: the CloudEvents SDK refuses it: {e}")
                continue
            if ev.get_dataschema() != f"urn:cqrs:event:{ev.get_type()}":
                bad_message(f"{at}: dataschema {ev.get_dataschema()} does not name the schema of "
                            f"{ev.get_type()}")
            v = validators.get(ev.get_type())
            errs = list(v.iter_errors(ev.get_data())) if v is not None else []
            if errs:
                bad_message(f"{at}: {ev.get_type()}: {errs[0].message}")
            seq = ev.get_extension("sequence")
            if not isinstance(seq, str) or not seq.isdigit():
                bad_message(f"{at}: sequence {seq!r} is not a string of decimal digits")
                continue
            agg = where + (ev.get_subject(),)
            if agg in last and not last[agg] < seq:
                bad_message(f"{at}: sequence {seq} of {agg[2]} does not sort after its earlier "
                            f"{last[agg]} as a string")
            last[agg] = seq
        if open_parts:
            fail(f"{len(open_parts)} partitions not read to their end within 120 s")
    finally:
        consumer.close()
    print(f"{'ok' if bad == 0 else 'FAIL'}: {n - bad} of {n} Kafka messages of {len(topics)} event "
          "topics parsed by the CloudEvents SDK with their data valid, dataschema naming their "
          "schema and each aggregate's sequence values sorting as strings")
    if n == 0:
        fail("no message in the event topics: run the e2e tests first")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "static":
        static(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 2 and sys.argv[1] == "events":
        events()
    else:
        print(__doc__)
        sys.exit(2)
    sys.exit(1 if failures else 0)
