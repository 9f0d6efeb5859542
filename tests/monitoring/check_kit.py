#!/usr/bin/env python3
"""Static checks of the operator kit in deploy/monitoring/.

  check_kit.py rules     promtool check rules deploy/monitoring/*.rules.yml and promtool test
                         rules deploy/monitoring/*.test.yml; every alert has a severity
                         (warning|critical), a summary, a description and a runbook_url naming
                         its own section of RUNBOOK.md, which exists and names a cqrsctl command;
                         every alert (each severity) fires in some test and every alert has a
                         test where it must stay quiet; no runbook section without its alert;
                         the dashboard: Grafana schema version 42, the data source a variable
                         every panel and query uses, no other variable than $__rate_interval,
                         one row per component with its four golden signals, and the SLO row;
                         README's operating section points to the kit.
  check_kit.py mutants   the promtool tests catch broken alerts: for every alert, a copy of the
                         rules where it can never fire, one (when it has a `for`) where it fires
                         at once, and one per threshold of its expression with that threshold
                         removed (the comparison no longer filters), must each make
                         `promtool test rules` fail. So each alert has a test where it fires,
                         one where it is pending, and one just below each of its thresholds.
"""
import concurrent.futures
import copy
import json
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
MON = ROOT / "deploy" / "monitoring"
RULES = MON / "cqrs.rules.yml"
TESTS = MON / "cqrs.test.yml"
RUNBOOK = MON / "RUNBOOK.md"
DASHBOARD = MON / "cqrs-dashboard.json"
GRAFANA_SCHEMA_VERSION = 42  # the last schema version of Grafana's classic dashboard JSON
COMPONENT_ROWS = ("cqrs-commandd", "Relay", "cqrs-queryd", "Projector")
GOLDEN = ("Traffic", "Errors", "Latency", "Saturation")
# A filtering comparison with a number (a threshold), e.g. "> 0.05", ">= 10", "> 14.4 * 0.01".
COMPARISON = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*[0-9.]+(?:\s*\*\s*[0-9.]+)?")
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg, flush=True)


def promtool(*args, cwd=None):
    r = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd)
    return r.returncode, r.stdout + r.stderr


def alerts(groups):
    return [r for g in groups for r in g["rules"] if "alert" in r]


def runbook_sections():
    sections, current = {}, None
    for line in RUNBOOK.read_text().splitlines():
        m = re.match(r"^## (.+)$", line)
        if m:
            current = m.group(1).strip()
            sections[current] = []
        elif current:
            sections[current].append(line)
    return {k: "\n".join(v) for k, v in sections.items()}


def check_rules():
    for f in sorted(MON.glob("*.rules.yml")):
        rc, out = promtool("check", "rules", str(f))
        if rc != 0:
            fail(f"promtool check rules {f.name}:\n{out}")
        else:
            print(f"ok: promtool check rules {f.name}: {out.strip().splitlines()[-1].strip()}")
    for f in sorted(MON.glob("*.test.yml")):
        rc, out = promtool("test", "rules", f.name, cwd=MON)
        if rc != 0:
            fail(f"promtool test rules {f.name}:\n{out}")
        else:
            print(f"ok: promtool test rules {f.name}: SUCCESS")

    groups = yaml.safe_load(RULES.read_text())["groups"]
    sections = runbook_sections()
    names = set()
    for a in alerts(groups):
        name, sev = a["alert"], a.get("labels", {}).get("severity")
        names.add(name)
        ann = a.get("annotations", {})
        if sev not in ("warning", "critical"):
            fail(f"{name}: severity {sev!r}, expected warning or critical")
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key, "").strip():
                fail(f"{name} ({sev}): no {key} annotation")
        want = f"deploy/monitoring/RUNBOOK.md#{name.lower()}"
        if ann.get("runbook_url") != want:
            fail(f"{name}: runbook_url {ann.get('runbook_url')!r}, expected {want!r}")
        if name not in sections:
            fail(f"{name}: RUNBOOK.md has no section '## {name}'")
        elif "cqrsctl" not in sections[name]:
            fail(f"{name}: its RUNBOOK.md section names no cqrsctl command")
    for s in sections:
        if s.startswith("Cqrs") and s not in names:
            fail(f"RUNBOOK.md section '{s}' has no alert")
    print(f"ok: {len(alerts(groups))} alerting rules ({len(names)} alerts) have a severity, a "
          "summary, a description and a runbook section naming a cqrsctl command")

    # Every alert is tested both ways.
    fires, quiet = set(), set()
    for t in yaml.safe_load(TESTS.read_text())["tests"]:
        for a in t.get("alert_rule_test", []):
            if a.get("exp_alerts"):
                for e in a["exp_alerts"]:
                    fires.add((a["alertname"], e.get("exp_labels", {}).get("severity")))
            else:
                quiet.add(a["alertname"])
    for a in alerts(groups):
        key = (a["alert"], a["labels"]["severity"])
        if key not in fires:
            fail(f"{key[0]} ({key[1]}): no test where it fires")
        if a["alert"] not in quiet:
            fail(f"{a['alert']}: no test where it must stay quiet")
    print(f"ok: every alert fires in a test ({len(fires)} alert/severity pairs) and has a "
          f"test where it stays quiet ({len(quiet)} alerts)")

    check_dashboard()

    readme = (ROOT / "README.md").read_text()
    op = readme.split("## Operating it", 1)[-1].split("\n## ", 1)[0]
    for ref in ("deploy/monitoring", "RUNBOOK.md"):
        if ref not in op:
            fail(f"README's 'Operating it' does not mention {ref}")


def check_dashboard():
    d = json.loads(DASHBOARD.read_text())
    if d.get("schemaVersion") != GRAFANA_SCHEMA_VERSION:
        fail(f"dashboard schemaVersion {d.get('schemaVersion')}, expected {GRAFANA_SCHEMA_VERSION}")
    variables = d.get("templating", {}).get("list", [])
    ds = [v for v in variables if v.get("type") == "datasource"]
    if len(ds) != 1 or ds[0].get("name") != "datasource" or ds[0].get("query") != "prometheus":
        fail("the dashboard needs one data source variable `datasource` of type prometheus")
    if len(variables) != 1:
        fail(f"the dashboard has variables besides the data source: {[v.get('name') for v in variables]}")
    want_ds = {"type": "prometheus", "uid": "${datasource}"}
    ids, rows, current = set(), [], None
    for p in d.get("panels", []):
        if p.get("id") in ids:
            fail(f"panel id {p.get('id')} used twice")
        ids.add(p.get("id"))
        if "gridPos" not in p:
            fail(f"panel {p.get('title')!r} has no gridPos")
        if p.get("type") == "row":
            if p.get("collapsed") or p.get("panels"):
                fail(f"row {p.get('title')!r}: keep rows expanded (panels at top level)")
            current = [p.get("title", ""), []]
            rows.append(current)
            continue
        if current is None:
            fail(f"panel {p.get('title')!r} is above the first row")
            continue
        current[1].append(p.get("title", ""))
        if p.get("datasource") != want_ds:
            fail(f"panel {p.get('title')!r}: datasource {p.get('datasource')}, expected {want_ds}")
        if not p.get("targets"):
            fail(f"panel {p.get('title')!r} has no query")
        for t in p.get("targets", []):
            if t.get("datasource") != want_ds:
                fail(f"panel {p.get('title')!r} query {t.get('refId')}: datasource {t.get('datasource')}")
            if not t.get("expr"):
                fail(f"panel {p.get('title')!r} query {t.get('refId')}: no expr")
            for var in re.findall(r"\$\{?\w+", t.get("expr", "")):
                if var != "$__rate_interval":
                    fail(f"panel {p.get('title')!r}: variable {var} (only $__rate_interval is known "
                         "to tests/monitoring/e2e_prometheus.py)")
    for component in COMPONENT_ROWS:
        match = [r for r in rows if component in r[0]]
        if len(match) != 1:
            fail(f"the dashboard needs one row for {component}, found {len(match)}")
            continue
        for signal in GOLDEN:
            if not any(t.startswith(signal) for t in match[0][1]):
                fail(f"row {match[0][0]!r} has no {signal} panel")
    if not any("SLO" in r[0] for r in rows):
        fail("the dashboard has no SLO row")
    print(f"ok: dashboard: schema version {d.get('schemaVersion')}, {len(rows)} rows, "
          f"{sum(len(r[1]) for r in rows)} panels, all on the datasource variable; "
          f"traffic, errors, latency and saturation for {', '.join(COMPONENT_ROWS)}; the SLO row")


def check_mutants():
    doc = yaml.safe_load(RULES.read_text())
    rc, out = promtool("test", "rules", TESTS.name, cwd=MON)
    if rc != 0:
        fail(f"the unmutated tests fail already:\n{out}")
        return
    # Controls: the unmutated rules against the same filtered tests must pass (so a mutant is
    # caught by an assertion, not by a test file this script broke).
    jobs = [(f"control for {a}", a, doc) for a in sorted({r["alert"] for r in alerts(doc["groups"])})]
    for gi, g in enumerate(doc["groups"]):
        for ri, r in enumerate(g["rules"]):
            if "alert" not in r:
                continue
            what = f"{r['alert']} ({r['labels']['severity']})"
            never = copy.deepcopy(doc)
            never["groups"][gi]["rules"][ri]["expr"] = "vector(1) unless vector(1)"
            jobs.append((f"{what} never firing", r["alert"], never))
            if r.get("for"):
                at_once = copy.deepcopy(doc)
                del at_once["groups"][gi]["rules"][ri]["for"]
                jobs.append((f"{what} firing without its for: {r['for']}", r["alert"], at_once))
            for m in COMPARISON.finditer(r["expr"]):
                loose = copy.deepcopy(doc)
                loose["groups"][gi]["rules"][ri]["expr"] = r["expr"][:m.start()] + r["expr"][m.end():]
                jobs.append((f"{what} without its filter `{m.group(0).strip()}`", r["alert"], loose))

    tests = yaml.safe_load(TESTS.read_text())

    def run(job):
        name, alert, rules = job
        # Only the tests that look at this alert: quicker, and none of the others could catch it.
        mine = dict(tests, tests=[t for t in tests["tests"]
                                  if any(a["alertname"] == alert for a in t.get("alert_rule_test", []))])
        d = pathlib.Path(tempfile.mkdtemp(prefix="cqrs-mutant."))
        try:
            (d / RULES.name).write_text(yaml.safe_dump(rules, sort_keys=False))
            (d / TESTS.name).write_text(yaml.safe_dump(mine, sort_keys=False))
            rc, _ = promtool("test", "rules", TESTS.name, cwd=d)
            return name, rc
        finally:
            shutil.rmtree(d, ignore_errors=True)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for name, rc in pool.map(run, jobs):
            if name.startswith("control for "):
                if rc != 0:
                    fail(f"{name}: the unmutated rules fail the tests of that alert alone")
            elif rc == 0:
                fail(f"mutant survived: {name}: promtool test rules still passes")
            else:
                print(f"ok: caught: {name}", flush=True)
    n = sum(1 for j in jobs if not j[0].startswith("control for "))
    print(f"ok: {n} broken alerts, each caught by promtool test rules (the unmutated rules pass "
          "the same tests)")


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("rules", "mutants"):
        print(__doc__)
        return 2
    if not shutil.which("promtool"):
        print("FAIL: promtool is missing (Debian package prometheus; deploy/local/deps.sh installs it)")
        return 1
    check_rules() if sys.argv[1] == "rules" else check_mutants()
    if failures:
        print(f"{len(failures)} failures")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
