#!/usr/bin/env python3
"""The event schemas' compatibility gate (README, "Evolving an event").

  check_compat.py [--released DIR] [--current DIR]
      every schema of DIR --released (default schemas/events/released: the event versions as
      last released) is compared with the same version in --current (default schemas/events);
      exits 1 naming the rule each change breaks.
  check_compat.py --cases DIR
      the gate's own test: each folder of DIR holds released/ and current/ schema folders and
      a file `expect` listing the rules the gate must report (one per line; "compatible" for
      none); exits 1 unless every case reports exactly those.
  check_compat.py --release
      copies the current schemas over the released ones (the release step: run it, review the
      diff, commit it with the release).

An event version is a contract with every reader of the log, which is kept forever and
replayed: the readers of a version — projections, `cqrsctl rebuild`, consumers on Kafka — must
read every event ever written under it, and events written under the current schema must be
read by readers built against the released one (a rolling deployment runs both). So within a
version the one change allowed is a new optional property where the schema's content model is
open (no `additionalProperties: false` there: readers ignore members they do not know) — the
platform's own schemas are closed, so for them every change of shape takes a new version. Edits
of titles and descriptions are free. Anything else needs a new version, <type>.v<N+1>, with an
upcaster from v<N> (libcqrs). The rules:

  C1 removed-version   a released version's schema was deleted (its events stay in the log)
  C2 removed-property  a property was removed (readers of the version rely on it)
  C3 required-added    a property became required, or a required one was added (old events
                       lack it)
  C4 required-dropped  a required property became optional (readers rely on its presence)
  C5 type-changed      a value's type changed
  C6 rule-changed      a validation keyword changed (bounds, length, pattern, format, enum,
                       const, items, additionalProperties…): tightened, old events may fail it;
                       loosened, readers of the version may meet values they cannot hold
  C7 id-changed        the schema's $id (urn:cqrs:event:<type>.v<N>) changed
  C8 closed-extended   a property added where the released schema said
                       additionalProperties: false (a reader validating against it refuses it)
  V1 version-gap       <type>.v<N> exists without <type>.v<N-1>
  V2 misnamed          a file's name is not <type>.v<N>.json or its $id does not match it
"""
import argparse
import json
import pathlib
import re
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
EVENTS = ROOT / "schemas" / "events"
RELEASED = EVENTS / "released"
# Keywords that document and do not validate: free to change within a version.
ANNOTATIONS = {"title", "description", "examples", "$comment", "default", "deprecated"}
# Keywords compared structurally below ($id and $schema too: a changed dialect or nested $id is
# a changed rule).
STRUCTURAL = {"properties", "required", "items", "type"}
# Keywords whose order carries no meaning.
UNORDERED = {"type", "enum", "required"}
NAME = re.compile(r"^(?P<type>[a-z][a-z0-9-]*(\.[a-z][a-z0-9-]*)+)\.v(?P<n>[1-9][0-9]*)\.json$")

RULES = {
    "C1": "removed-version", "C2": "removed-property", "C3": "required-added",
    "C4": "required-dropped", "C5": "type-changed", "C6": "rule-changed", "C7": "id-changed",
    "C8": "closed-extended",
    "V1": "version-gap", "V2": "misnamed",
}
ADVICE = "keep the released contract, or publish the change as a new version with an upcaster"


def load(folder):
    return {f.name: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}


def same(key, a, b):
    if key in UNORDERED and isinstance(a, list) and isinstance(b, list):
        return sorted(map(json.dumps, a)) == sorted(map(json.dumps, b))
    if key in UNORDERED and isinstance(a, list) != isinstance(b, list):
        # "integer" and ["integer"] say the same
        return (a if isinstance(a, list) else [a]) == (b if isinstance(b, list) else [b])
    return a == b


def compare(old, new, path, report):
    """Reports what breaks between two schema nodes of one event version."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        # a boolean schema (true/false) on either side: only equality is compatible
        if old != new:
            report("C6", path, f"{json.dumps(old)} became {json.dumps(new)}")
        return
    if not same("type", old.get("type"), new.get("type")):
        report("C5", path, f"type {old.get('type')!r} became {new.get('type')!r}")
    for key in sorted((set(old) | set(new)) - ANNOTATIONS - STRUCTURAL):
        if not same(key, old.get(key), new.get(key)):
            report("C6", path, f"{key} {old.get(key, '(none)')!r} became {new.get(key, '(none)')!r}")
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    old_req, new_req = set(old.get("required", [])), set(new.get("required", []))
    for name in sorted(old_props):
        if name not in new_props:
            report("C2", f"{path}/properties/{name}", "removed")
        else:
            compare(old_props[name], new_props[name], f"{path}/properties/{name}", report)
    if old.get("additionalProperties") is False:
        for name in sorted(set(new_props) - set(old_props) - new_req):
            report("C8", f"{path}/properties/{name}", "added where additionalProperties is false")
    for name in sorted(new_req - old_req):
        report("C3", f"{path}/properties/{name}",
               "added as required" if name not in old_props else "became required")
    for name in sorted(old_req - new_req):
        if name in new_props:
            report("C4", f"{path}/properties/{name}", "no longer required")
    if "items" in old or "items" in new:
        if isinstance(old.get("items"), dict) and isinstance(new.get("items"), dict):
            compare(old["items"], new["items"], f"{path}/items", report)
        elif old.get("items") != new.get("items"):
            report("C6", f"{path}/items", "items changed")


def check(released_dir, current_dir):
    """Returns [(rule, file, where, what)] for every break."""
    found = []
    released, current = load(released_dir), load(current_dir)

    def reporter(fname):
        return lambda rule, where, what: found.append((rule, fname, where, what))

    versions = {}
    for fname, schema in current.items():
        m = NAME.match(fname)
        if not m:
            found.append(("V2", fname, "", "not named <type>.v<N>.json"))
            continue
        expected_id = f"urn:cqrs:event:{fname[:-len('.json')]}"
        if schema.get("$id") != expected_id:
            found.append(("V2", fname, "/$id", f"{schema.get('$id')!r}, expected {expected_id!r}"))
        versions.setdefault(m["type"], set()).add(int(m["n"]))
    for etype, ns in sorted(versions.items()):
        for n in sorted(ns):
            if n > 1 and n - 1 not in ns:
                found.append(("V1", f"{etype}.v{n}.json", "", f"{etype}.v{n - 1} is missing"))
    for fname, old in released.items():
        new = current.get(fname)
        if new is None:
            found.append(("C1", fname, "", "deleted, yet its events stay in the log"))
            continue
        if old.get("$id") != new.get("$id"):
            found.append(("C7", fname, "/$id", f"{old.get('$id')!r} became {new.get('$id')!r}"))
        compare({k: v for k, v in old.items() if k != "$id"},
                {k: v for k, v in new.items() if k != "$id"}, "", reporter(fname))
    return found


def print_found(found):
    for rule, fname, where, what in found:
        print(f"FAIL [{rule} {RULES[rule]}] {fname}{' ' + where if where else ''}: {what} — {ADVICE}")


def run_cases(cases_dir):
    bad = 0
    for case in sorted(p for p in cases_dir.iterdir() if p.is_dir()):
        expect = sorted({line.strip() for line in (case / "expect").read_text().splitlines()
                         if line.strip()} - {"compatible"})
        got = sorted({rule for rule, *_ in check(case / "released", case / "current")})
        ok = got == expect
        bad += not ok
        print(f"{'ok' if ok else 'FAIL'}: case {case.name}: expected {expect or 'compatible'}, "
              f"the gate reported {got or 'compatible'}")
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--released", type=pathlib.Path, default=RELEASED)
    ap.add_argument("--current", type=pathlib.Path, default=EVENTS)
    ap.add_argument("--cases", type=pathlib.Path)
    ap.add_argument("--release", action="store_true")
    a = ap.parse_args()
    if a.cases:
        sys.exit(1 if run_cases(a.cases) else 0)
    if a.release:
        a.released.mkdir(parents=True, exist_ok=True)
        for f in a.current.glob("*.json"):
            shutil.copyfile(f, a.released / f.name)
        print(f"released: {len(list(a.current.glob('*.json')))} schemas copied to {a.released}")
        return
    found = check(a.released, a.current)
    print_found(found)
    n = len(load(a.released))
    if found:
        print(f"{len(found)} incompatible change(s) in {a.current} against {n} released versions")
        sys.exit(1)
    print(f"ok: {len(load(a.current))} event schemas, compatible with the {n} released versions")


if __name__ == "__main__":
    main()
