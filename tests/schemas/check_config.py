#!/usr/bin/env python3
"""Configuration checks, from each daemon's own --help table:

  check_config.py <cqrs-commandd> <cqrs-queryd> <README.md>
    - every setting the daemons print is in the README's configuration tables, and the README
      names no setting the daemons do not have;
    - every bad value of every setting is rejected at start-up: exit status 2, before
      anything starts (integers past their range and not numbers, booleans and enums out of
      their words, required settings unset, an unreadable tokens file, Redis TLS files that
      do not load, TLS settings with a plain-text Redis URL);
    - the same for the Kafka client properties every Kafka client reads (CQRS_KAFKA_PROPERTY_<NAME>,
      CQRS_KAFKA_PROPERTIES_FILE, CQRS_KAFKA_DEBUG): a refused, unknown or badly valued property,
      an unreadable file — and a secret property's value (a canary) never in the output, nor in
      --help;
    - the README's least-privilege Redis ACL line is deploy/local/redis-cqrs.acl's.
"""
import os
import re
import subprocess
import sys

failures = []


def table(binary):
    out = subprocess.run([binary, "--help"], check=True, capture_output=True, text=True).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s+(CQRS_[A-Z0-9_]+)\s+(\w+)\s+default: (\S+)(?:\s+range: (-?\d+)\.\.(-?\d+))?"
                     r"(?:\s+one of: (\S+))?", line)
        if m:
            name, typ, default, lo, hi, choices = m.groups()
            rows[name] = dict(type=typ, default=default, lo=lo, hi=hi, choices=choices)
    return rows


def base_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    env.update(CQRS_PG_DSN="host=127.0.0.1 port=1 dbname=x user=x",
               CQRS_KAFKA_BROKERS="127.0.0.1:1", CQRS_REDIS_URL="redis://127.0.0.1:1/0",
               CQRS_HTTP_PORT="0", CQRS_QUERY_ROLE="serve")
    return env


def bad_values(row):
    if row["type"] == "int":
        vals = ["not-a-number", "12abc"]
        if row["hi"] is not None:
            vals.append(str(int(row["hi"]) + 1))
            vals.append(str(int(row["lo"]) - 1))
        return vals
    if row["type"] == "bool":
        return ["maybe"]
    if row["type"] == "enum":
        return ["no-such-choice"]
    return []


def check_rejections(binary, rows):
    name = os.path.basename(binary)
    checked = 0
    for var, row in rows.items():
        cases = [(v, None) for v in bad_values(row)]
        if row["default"] == "(required)":
            cases.append((None, "unset"))
        if var == "CQRS_AUTH_TOKENS_FILE":
            cases.append(("/nonexistent/tokens", None))
        if var.startswith("CQRS_REDIS_TLS_") and var.endswith("_FILE"):
            cases.append(("/nonexistent/file.pem", "rediss"))  # does not load
        if var.startswith("CQRS_REDIS_TLS_"):
            cases.append(("/some/value", "redis"))  # with a plain-text URL
        if var == "CQRS_REDIS_URL":
            cases.append(("redis://:secret@host:0/0", None))
        for value, scheme in cases:
            env = base_env()
            if scheme:
                env["CQRS_REDIS_URL"] = f"{scheme}://127.0.0.1:1/0"
            if value is None:
                env.pop(var, None)
            else:
                env[var] = value
            try:
                p = subprocess.run([binary], env=env, capture_output=True, text=True, timeout=20)
            except subprocess.TimeoutExpired:
                failures.append(f"{name}: {var}={value!r} was accepted (the daemon kept running)")
                continue
            if p.returncode != 2:
                failures.append(f"{name}: {var}={value!r} exited {p.returncode}, expected 2")
            elif var not in p.stderr:
                failures.append(f"{name}: {var}={value!r}: the error does not name the setting")
            elif value and "secret" in value and "secret" in p.stderr:
                failures.append(f"{name}: {var}={value!r}: the error quotes the password")
            checked += 1
    print(f"ok: {name}: {checked} bad values rejected with exit 2")


CANARY = "s3cr3t-canary-7f3a"

# (extra environment, what the error must name); every case also carries a secret canary.
KAFKA_BAD = [
    ({"CQRS_KAFKA_PROPERTY_ENABLE_IDEMPOTENCE": "false"}, "CQRS_KAFKA_PROPERTY_ENABLE_IDEMPOTENCE"),
    ({"CQRS_KAFKA_PROPERTY_BOOTSTRAP_SERVERS": "elsewhere:9092"}, "CQRS_KAFKA_PROPERTY_BOOTSTRAP_SERVERS"),
    ({"CQRS_KAFKA_PROPERTY_NO_SUCH_PROPERTY": "1"}, "CQRS_KAFKA_PROPERTY_NO_SUCH_PROPERTY"),
    ({"CQRS_KAFKA_PROPERTY_LINGER_MS": "soon"}, "CQRS_KAFKA_PROPERTY_LINGER_MS"),
    ({"CQRS_KAFKA_PROPERTY_SASL_USERNAME_FILE": "/nonexistent/user"}, "CQRS_KAFKA_PROPERTY_SASL_USERNAME_FILE"),
    ({"CQRS_KAFKA_PROPERTIES_FILE": "/nonexistent/kafka.properties"}, "CQRS_KAFKA_PROPERTIES_FILE"),
    ({"CQRS_KAFKA_PROPERTY_SECURITY_PROTOCOL": "SASL_SSL", "CQRS_KAFKA_PROPERTY_SASL_MECHANISMS": "SCRAM-SHA-512",
      "CQRS_KAFKA_PROPERTY_SASL_USERNAME": "cqrs", "CQRS_KAFKA_PROPERTY_SSL_CA_LOCATION": "/nonexistent/ca.crt"},
     "CQRS_KAFKA_PROPERTY_SSL_CA_LOCATION"),
    ({"CQRS_KAFKA_DEBUG": "nonsense"}, "CQRS_KAFKA_DEBUG"),
]
# Only the relay's producer sees these (idempotence): its start-up trial names the property.
KAFKA_BAD_RELAY = [
    ({"CQRS_KAFKA_PROPERTY_MAX_IN_FLIGHT": "50"}, "max.in.flight"),
    ({"CQRS_KAFKA_PROPERTY_TRANSACTION_TIMEOUT_MS": "2000"}, "transaction.timeout.ms"),
]


def check_kafka_properties(binary):
    name = os.path.basename(binary)
    env = base_env()
    env["CQRS_KAFKA_PROPERTY_SASL_PASSWORD"] = CANARY
    out = subprocess.run([binary, "--help"], env=env, capture_output=True, text=True).stdout
    if CANARY in out:
        failures.append(f"{name} --help shows a secret property's value")
    cases = KAFKA_BAD + (KAFKA_BAD_RELAY if name == "cqrs-commandd" else [])
    for extra, named in cases:
        env = base_env()
        env["CQRS_KAFKA_PROPERTY_SASL_PASSWORD"] = CANARY
        env.update(extra)
        try:
            p = subprocess.run([binary], env=env, capture_output=True, text=True, timeout=20)
        except subprocess.TimeoutExpired:
            failures.append(f"{name}: {extra} was accepted (the daemon kept running)")
            continue
        if p.returncode != 2:
            failures.append(f"{name}: {extra} exited {p.returncode}, expected 2")
        elif named not in p.stderr + p.stdout:
            failures.append(f"{name}: {extra}: the error does not name {named}")
        if CANARY in p.stderr + p.stdout:
            failures.append(f"{name}: {extra}: a secret property's value is in the output")
    print(f"ok: {name}: {len(cases)} bad Kafka client properties rejected with exit 2")


def check_redis_acl(readme, text):
    """The README quotes the ACL rules the stack and the tests use, word for word."""
    path = os.path.join(os.path.dirname(os.path.abspath(readme)), "deploy/local/redis-cqrs.acl")
    rules = [line.strip() for line in open(path, encoding="utf-8") if line.strip() and not line.startswith("#")]
    quoted = re.findall(r"^ACL SETUSER cqrs on >PASSWORD (.*)$", text, re.M)
    if len(rules) != 1 or quoted != rules:
        failures.append("the README's `ACL SETUSER cqrs` line is not deploy/local/redis-cqrs.acl's rules")
    else:
        print("ok: the README's Redis ACL line is deploy/local/redis-cqrs.acl")


def main():
    commandd, queryd, readme = sys.argv[1:4]
    text = open(readme, encoding="utf-8").read()
    check_redis_acl(readme, text)
    section = text[text.index("## Configuration"):text.index("\n## ", text.index("## Configuration") + 5)]
    documented = set(re.findall(r"^\| `(CQRS_[A-Z0-9_]+)`", section, re.M))
    documented |= set(re.findall(r"`(CQRS_[A-Z0-9_]+)`", section))
    served = set()
    for binary in (commandd, queryd):
        rows = table(binary)
        if not rows:
            failures.append(f"{binary} --help printed no settings")
        served |= set(rows)
        for var in rows:
            if var not in documented:
                failures.append(f"{var} ({os.path.basename(binary)}) is not in the README's configuration section")
        check_rejections(binary, rows)
        check_kafka_properties(binary)
    # a README table row for a setting no daemon has
    for var in sorted(set(re.findall(r"^\| `(CQRS_[A-Z0-9_]+)`", section, re.M)) - served):
        failures.append(f"README documents {var}, which neither daemon has")
    print(f"ok: {len(served)} settings checked against the README" if not failures else "")
    for f in failures:
        print("FAIL:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
