#!/usr/bin/env python3
"""Static checks of the alert rules and the dashboard (manifests/monitoring):

- every alert has a runbook_url into docs/OPERATIONS.md whose anchor is a heading
  of that file (GitHub's anchor of "### FerrySidecarDown" is #ferrysidecardown);
- FerrySidecarDown does not key on a job name (discovery decides the job: the
  PodMonitor's is "<its namespace>/<its name>", annotation-based discovery's is the
  scrape config's own);
- the dashboard has the template variables cluster and peer, every ferry_* selector
  of every panel filters on $cluster (and on $peer where the metric has a peer
  label), and it has panels for bytes saved, conflicts and lag per peer;
- every ferry_* name used exists in crates/ferry/src/telemetry.rs.

Prints one line per check and "N passed, N failed"; exits 1 on failure.
"""

import json
import os
import re
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNBOOKS = "https://github.com/ferry-io/ferry/blob/main/docs/OPERATIONS.md#"
# Metrics with a peer label (telemetry.rs: the *Vec metrics created with ["peer"]).
PEER_METRICS = {"ferry_replication_lag_seconds", "ferry_batches_sent_total", "ferry_bytes_sent_total",
                "ferry_peer_connected", "ferry_unacked_batches", "ferry_acked_seq", "ferry_resyncs_total"}


def github_anchor(heading):
    a = heading.strip().lower()
    a = re.sub(r"[^\w\- ]", "", a)
    return a.replace(" ", "-")


def main():
    passed = failed = 0

    def check(what, problems):
        nonlocal passed, failed
        if problems:
            failed += 1
            print(f"FAIL {what}")
            for p in problems:
                print(f"     {p}")
        else:
            passed += 1
            print(f"ok   {what}")

    with open(os.path.join(REPO, "docs", "OPERATIONS.md"), encoding="utf-8") as f:
        anchors = {github_anchor(m) for m in re.findall(r"^#+\s+(.*)$", f.read(), re.M)}
    with open(os.path.join(REPO, "manifests", "monitoring", "prometheusrule.yaml"), encoding="utf-8") as f:
        rule = yaml.safe_load(f)
    with open(os.path.join(REPO, "crates", "ferry", "src", "telemetry.rs"), encoding="utf-8") as f:
        registered = set(re.findall(r'"(ferry_[a-z_]+)"', f.read()))
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    check(f"{len(alerts)} alerts found", [] if alerts else ["no alerts"])
    for r in alerts:
        url = (r.get("annotations") or {}).get("runbook_url", "")
        problems = []
        if not url.startswith(RUNBOOKS):
            problems.append(f"runbook_url {url!r} does not point into {RUNBOOKS}")
        elif url[len(RUNBOOKS):] not in anchors:
            problems.append(f"#{url[len(RUNBOOKS):]} is not a heading of docs/OPERATIONS.md")
        check(f"{r['alert']}: runbook_url into docs/OPERATIONS.md", problems)
    down = [r for r in alerts if r["alert"] == "FerrySidecarDown"]
    check("FerrySidecarDown does not key on a job name",
          ["no FerrySidecarDown"] if not down else
          ([f"expr {down[0]['expr']!r} matches on job"] if re.search(r"\bjob\s*=", down[0]["expr"]) else []))

    with open(os.path.join(REPO, "manifests", "monitoring", "dashboard.json"), encoding="utf-8") as f:
        dash = json.load(f)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    check("dashboard: template variables cluster and peer",
          [f"no ${n}" for n in ("cluster", "peer") if n not in variables] +
          [f"${n} has no All matching an absent label (allValue .*)" for n in ("cluster", "peer")
           if n in variables and variables[n].get("allValue") != ".*"])
    used = set()
    for panel in dash["panels"]:
        problems = []
        for t in panel.get("targets", []):
            expr = t.get("expr", "")
            for m in re.finditer(r"\b(ferry_[a-z_]+)(\{[^}]*\})?", expr):
                name, sel = m.group(1), m.group(2) or ""
                used.add(name)
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                if 'cluster=~"$cluster"' not in sel:
                    problems.append(f"{name} is not filtered by $cluster: {expr}")
                if base in PEER_METRICS and 'peer=~"$peer"' not in sel:
                    problems.append(f"{name} has a peer label but is not filtered by $peer: {expr}")
        check(f"dashboard panel {panel.get('title')!r}: filtered by the variables", problems)
    for v in variables.values():
        q = (v.get("query") or {}).get("query", "") if isinstance(v.get("query"), dict) else ""
        used |= set(re.findall(r"\bferry_[a-z_]+", q))

    def panels_using(pattern):
        return [p["title"] for p in dash["panels"] if any(re.search(pattern, t.get("expr", "")) for t in p.get("targets", []))]

    check("dashboard: a panel for bytes saved", [] if panels_using(r"ferry_bytes_saved_total") else ["none"])
    check("dashboard: a panel for conflicts", [] if panels_using(r"ferry_conflict_files") else ["none"])
    check("dashboard: a panel for replication lag per peer",
          [] if panels_using(r"sum by \(peer, le\) \(rate\(ferry_replication_lag_seconds_bucket") else ["none"])
    for r in alerts:
        used |= set(re.findall(r"\bferry_[a-z_]+", r["expr"]))
    missing = sorted(n for n in used if n not in registered and re.sub(r"_(bucket|sum|count)$", "", n) not in registered)
    check(f"all {len(used)} ferry_* names used exist in telemetry.rs", missing)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
