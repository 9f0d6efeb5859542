#!/usr/bin/env python3
"""The monitoring objects of a rendered kustomization (`kubectl kustomize deploy/k8s/...`).

  check_k8s.py <rendered.yaml>

kubernetes-validate knows the built-in kinds only: for a custom resource it prints a warning
and passes it unchecked. tests/deploy/check_deploy.sh therefore hands the rendered objects to
this script, which checks the Prometheus Operator's resources of the kit:
  - PrometheusRule and PodMonitor against a JSON Schema of the monitoring.coreos.com/v1 fields
    this kit uses (written here from the CRDs' documented fields; unknown fields are refused,
    as kubernetes-validate --strict does for the built-in kinds);
  - the PrometheusRule's spec is deploy/monitoring/cqrs.rules.yml, exactly (the generated
    prometheusrule.yaml is in step with the rules), and passes `promtool check rules`;
  - the PodMonitor selects the pods of the three Deployments, on a port they declare, with a
    Secret key that exists and holds the token of a `metrics`-scoped line of the tokens file;
  - the dashboard ConfigMap holds deploy/monitoring/cqrs-dashboard.json, exactly, and carries
    the grafana_dashboard label.
Prints what it checked; exits 1 on any failure.
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import yaml
from jsonschema import Draft202012Validator

ROOT = pathlib.Path(__file__).resolve().parents[2]
MON = ROOT / "deploy" / "monitoring"
DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
STRINGMAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "minLength": 1}, "namespace": {"type": "string"},
                   "labels": STRINGMAP, "annotations": STRINGMAP},
    "additionalProperties": False,
}
RULE = {
    "type": "object",
    "required": ["expr"],
    "properties": {
        "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "alert": {"type": "string", "minLength": 1},
        "expr": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        "for": DURATION,
        "keep_firing_for": DURATION,
        "labels": STRINGMAP,
        "annotations": STRINGMAP,
    },
    "additionalProperties": False,
    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
}
def custom_resource(kind, spec):
    """The fields every custom resource of the Prometheus Operator has, around its spec."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
        "additionalProperties": False,
    }


PROMETHEUS_RULE = custom_resource("PrometheusRule", {
    "type": "object",
    "properties": {"groups": {"type": "array", "items": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1}, "interval": DURATION,
                       "query_offset": DURATION, "limit": {"type": "integer"},
                       "labels": STRINGMAP, "partial_response_strategy": {"type": "string"},
                       "rules": {"type": "array", "items": RULE}},
        "additionalProperties": False,
    }}},
    "additionalProperties": False,
})
SECRET_KEY = {"type": "object", "required": ["key"],
              "properties": {"name": {"type": "string"}, "key": {"type": "string"},
                             "optional": {"type": "boolean"}},
              "additionalProperties": False}
LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": STRINGMAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"],
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}},
            "additionalProperties": False}},
    },
    "additionalProperties": False,
}
POD_MONITOR = custom_resource("PodMonitor", {
    "type": "object",
    "required": ["selector"],
    "properties": {
        "jobLabel": {"type": "string"},
        "selector": LABEL_SELECTOR,
        "namespaceSelector": {"type": "object",
                              "properties": {"any": {"type": "boolean"},
                                             "matchNames": {"type": "array", "items": {"type": "string"}}},
                              "additionalProperties": False},
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "podMetricsEndpoints": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "port": {"type": "string"}, "path": {"type": "string"},
                "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                "interval": DURATION, "scrapeTimeout": DURATION,
                "honorLabels": {"type": "boolean"},
                "authorization": {"type": "object",
                                  "properties": {"type": {"type": "string"},
                                                 "credentials": SECRET_KEY},
                                  "additionalProperties": False},
            },
            "additionalProperties": False,
        }},
    },
    "additionalProperties": False,
})

failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg)


def validate(obj, schema, what):
    errors = sorted(Draft202012Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
    for e in errors:
        fail(f"{what}: {'.'.join(str(p) for p in e.path) or '(top)'}: {e.message}")
    return not errors


def selects(selector, labels):
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions", []):
        has, val = e["key"] in labels, labels.get(e["key"])
        op = e["operator"]
        if (op == "In" and val not in e.get("values", [])) or \
           (op == "NotIn" and val in e.get("values", [])) or \
           (op == "Exists" and not has) or (op == "DoesNotExist" and has):
            return False
    return True


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    objs = [o for o in yaml.safe_load_all(pathlib.Path(sys.argv[1]).read_text()) if o]
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    rules = by_kind.get("PrometheusRule", [])
    monitors = by_kind.get("PodMonitor", [])
    if len(rules) != 1 or len(monitors) != 1:
        fail(f"expected one PrometheusRule and one PodMonitor, found {len(rules)} and {len(monitors)}")
        return 1

    # The PrometheusRule: valid, and the rule file itself.
    pr = rules[0]
    if validate(pr, PROMETHEUS_RULE, f"PrometheusRule/{pr['metadata']['name']}"):
        print(f"ok: PrometheusRule/{pr['metadata']['name']} matches the CRD's fields")
    expected = yaml.safe_load((MON / "cqrs.rules.yml").read_text())
    if pr.get("spec") != expected:
        fail("the PrometheusRule's spec differs from deploy/monitoring/cqrs.rules.yml: run "
             "deploy/monitoring/gen-prometheusrule.sh")
    else:
        print("ok: its spec is deploy/monitoring/cqrs.rules.yml")
    with tempfile.NamedTemporaryFile("w", suffix=".yml") as f:
        yaml.safe_dump(pr["spec"], f)
        f.flush()
        r = subprocess.run(["promtool", "check", "rules", f.name], capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"promtool check rules on the PrometheusRule's spec: {r.stdout}{r.stderr}")
        else:
            print("ok: promtool check rules passes on its spec")

    # The PodMonitor: valid, selects our pods on a declared port, with a real token.
    pm = monitors[0]
    if validate(pm, POD_MONITOR, f"PodMonitor/{pm['metadata']['name']}"):
        print(f"ok: PodMonitor/{pm['metadata']['name']} matches the CRD's fields")
    spec = pm["spec"]
    selected = []
    for d in by_kind.get("Deployment", []):
        tmpl = d["spec"]["template"]
        if not selects(spec["selector"], tmpl["metadata"].get("labels", {})):
            continue
        selected.append(d["metadata"]["name"])
        ports = {p.get("name") for c in tmpl["spec"]["containers"] for p in c.get("ports", [])}
        for ep in spec.get("podMetricsEndpoints", []):
            if ep.get("port") not in ports:
                fail(f"PodMonitor port {ep.get('port')!r} is not a port of {d['metadata']['name']}")
        job = tmpl["metadata"]["labels"].get(spec.get("jobLabel", ""), "")
        if not job.startswith("cqrs"):
            fail(f"{d['metadata']['name']}: job label {job!r} does not start with cqrs (CqrsTargetDown)")
    want = {"cqrs-commandd", "cqrs-queryd", "cqrs-projector"}
    if set(selected) != want:
        fail(f"the PodMonitor selects {sorted(selected)}, expected {sorted(want)}")
    else:
        print(f"ok: it selects the pods of {', '.join(sorted(selected))} on their port")
    secrets = {s["metadata"]["name"]: {**s.get("data", {}), **s.get("stringData", {})}
               for s in by_kind.get("Secret", [])}
    for ep in spec.get("podMetricsEndpoints", []):
        cred = ep.get("authorization", {}).get("credentials")
        if not cred:
            fail("a PodMetricsEndpoint without a token: /metrics needs one when tokens are configured")
            continue
        token = secrets.get(cred.get("name"), {}).get(cred["key"])
        if token is None:
            fail(f"the PodMonitor's token Secret {cred.get('name')}/{cred['key']} does not exist")
            continue
        lines = [ln.split() for ln in secrets[cred["name"]].get("tokens", "").splitlines()
                 if ln.strip() and not ln.lstrip().startswith("#")]
        if not any(len(ln) >= 3 and ln[1] == token.strip() and
                   ({"metrics", "admin"} & set(ln[2].split(","))) for ln in lines):
            fail(f"{cred.get('name')}/{cred['key']} is not a token of scope metrics in the tokens file")
        else:
            print(f"ok: its token ({cred.get('name')}/{cred['key']}) has the metrics scope in the tokens file")

    # The dashboard ConfigMap.
    cms = [c for c in by_kind.get("ConfigMap", []) if "cqrs-dashboard.json" in c.get("data", {})]
    if len(cms) != 1:
        fail(f"{len(cms)} ConfigMaps carry cqrs-dashboard.json, expected 1")
    else:
        cm = cms[0]
        if json.loads(cm["data"]["cqrs-dashboard.json"]) != json.loads((MON / "cqrs-dashboard.json").read_text()):
            fail("the dashboard ConfigMap differs from deploy/monitoring/cqrs-dashboard.json")
        elif cm["metadata"].get("labels", {}).get("grafana_dashboard") != "1":
            fail("the dashboard ConfigMap lacks the label grafana_dashboard: \"1\"")
        else:
            print(f"ok: ConfigMap/{cm['metadata']['name']} holds the dashboard, labelled grafana_dashboard=1")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
