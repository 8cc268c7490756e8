"""Real Prometheus against real ferry processes (issue 6).

Starts a primary and a replica on loopback, a Prometheus (Debian's package)
scraping both every second, runs a workload, and asserts through Prometheus's
HTTP API that the lag histogram, byte counters and applied seq are present and
move. Then checks that every metric the dashboard and the alert rules use is
one the daemons export, and that the metrics issue 6 lists are all exported.
Every dashboard query runs against this Prometheus with its template variables
filled in: each succeeds; the lag-per-peer, bytes-saved and conflicts panels
return series for cluster "test" and peer "replica"; and every query returns
nothing for a cluster that does not exist (so each panel obeys $cluster).
Usage: python3 prom_e2e.py FERRY_BINARY
"""

import json, os, re, shutil, socket, subprocess, sys, tempfile, time, urllib.parse, urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUIRED = """ferry_replication_lag_seconds ferry_batches_sent_total ferry_batches_applied_total
ferry_bytes_sent_total ferry_bytes_applied_total ferry_bytes_saved_total ferry_peer_connected
ferry_unacked_batches ferry_applied_seq ferry_consistent_as_of_timestamp_seconds ferry_resyncs_total
ferry_watch_overflows_total ferry_rescans_total ferry_exact_batches_total ferry_errors_total
ferry_epoch ferry_role ferry_build_info""".split()


def port():
    while True:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 0)); p = u.getsockname()[1]
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p)); t.close(); u.close(); return p
        except OSError:
            u.close()


def get(url, timeout=5):
    return urllib.request.urlopen(url, timeout=timeout).read().decode()


def query(prom, q):
    r = json.loads(get(f"http://127.0.0.1:{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q})))
    assert r["status"] == "success", r
    res = r["data"]["result"]
    return float(res[0]["value"][1]) if res else None


def fail(msg):
    print("FAIL", msg); sys.exit(1)


def main():
    ferry = os.path.abspath(sys.argv[1])
    base = tempfile.mkdtemp(prefix="ferry-prom-")
    procs = []
    try:
        run = lambda *a: subprocess.run([ferry, *a], check=True, capture_output=True)
        run("cert", "init", "--out", f"{base}/ca")
        for n in ("primary", "replica"):
            run("cert", "issue", "--ca", f"{base}/ca", "--name", n, "--out", f"{base}/tls-{n}")
            os.makedirs(f"{base}/root-{n}")
        qp, qr, mp, mr, pp = port(), port(), port(), port(), port()
        env = dict(os.environ, FERRY_LOG_LEVEL="warn")
        procs.append(subprocess.Popen([ferry, "run", "--root", f"{base}/root-replica", "--name", "replica", "--tls-dir", f"{base}/tls-replica",
                                       "--listen", f"127.0.0.1:{qr}", "--role", "replica", "--peer", f"primary=127.0.0.1:{qp}",
                                       "--metrics-addr", f"127.0.0.1:{mr}"], env=env, stderr=open(f"{base}/replica.log", "w")))
        procs.append(subprocess.Popen([ferry, "run", "--root", f"{base}/root-primary", "--name", "primary", "--tls-dir", f"{base}/tls-primary",
                                       "--listen", f"127.0.0.1:{qp}", "--role", "primary", "--peer", f"replica=127.0.0.1:{qr}",
                                       "--metrics-addr", f"127.0.0.1:{mp}"], env=env, stderr=open(f"{base}/primary.log", "w")))
        cfg = f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: ferry
    static_configs:
      - targets: ['127.0.0.1:{mp}']
        labels: {{cluster: test, namespace: test, pod: primary}}
      - targets: ['127.0.0.1:{mr}']
        labels: {{cluster: test, namespace: test, pod: replica}}
"""
        open(f"{base}/prometheus.yml", "w").write(cfg)
        procs.append(subprocess.Popen(["prometheus", f"--config.file={base}/prometheus.yml", f"--storage.tsdb.path={base}/tsdb",
                                       f"--web.listen-address=127.0.0.1:{pp}", "--log.level=warn"],
                                      stdout=open(f"{base}/prometheus.log", "w"), stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while True:
            try:
                if "Ready" in get(f"http://127.0.0.1:{pp}/-/ready", 2) and query(pp, 'sum(up{job="ferry"})') == 2:
                    break
            except Exception:
                pass
            if time.time() > deadline:
                fail("Prometheus did not come up scraping both nodes; see " + base)
            time.sleep(0.5)
        print("ok   Prometheus scrapes the primary and the replica")

        def workload(seconds, tag):
            t_end = time.time() + seconds
            i = 0
            while time.time() < t_end:
                with open(f"{base}/root-primary/{tag}-{i % 40}.dat", "wb") as f:
                    f.write(os.urandom(2048 + i % 7 * 1000))
                with open(f"{base}/root-primary/app.log", "ab") as f:
                    f.write(b"line %d\n" % i)
                i += 1
                time.sleep(0.02)

        qs = {
            "lag samples": 'sum(ferry_replication_lag_seconds_count{pod="primary"})',
            "bytes sent": 'sum(ferry_bytes_sent_total{pod="primary"})',
            "bytes applied": 'sum(ferry_bytes_applied_total{pod="replica"})',
            "applied seq": 'max(ferry_applied_seq{pod="replica"})',
        }
        workload(6, "a")
        time.sleep(3)
        first = {k: query(pp, q) for k, q in qs.items()}
        workload(6, "b")
        time.sleep(3)
        second = {k: query(pp, q) for k, q in qs.items()}
        for k in qs:
            if first[k] is None or second[k] is None:
                fail(f"{k}: no series in Prometheus ({qs[k]})")
            if not second[k] > first[k]:
                fail(f"{k} did not move: {first[k]} -> {second[k]}")
            print(f"ok   {k} present and moving: {first[k]:g} -> {second[k]:g}")
        p99 = query(pp, 'histogram_quantile(0.99, sum by (le) (rate(ferry_replication_lag_seconds_bucket{pod="primary"}[20s])))')
        if p99 is None or p99 != p99:
            fail("p99 lag is not computable from the histogram")
        print(f"ok   p99 lag from the histogram: {p99 * 1000:.1f} ms")
        if query(pp, 'ferry_peer_connected{pod="replica",peer="primary"}') != 1:
            fail("the replica does not report its primary session as connected")
        print("ok   both sides report the session as connected")

        # every metric the dashboard and the alert rules use is exported
        exported = set()
        for m in (mp, mr):
            for line in get(f"http://127.0.0.1:{m}/metrics").splitlines():
                if line.startswith("# TYPE "):
                    _, _, name, kind = line.split()
                    exported.add(name)
                    if kind == "histogram":
                        exported |= {name + "_bucket", name + "_sum", name + "_count"}
        used = set()
        for f in ("manifests/monitoring/dashboard.json", "manifests/monitoring/prometheusrule.yaml"):
            used |= {(f, n) for n in re.findall(r"\bferry_[a-z_]+", open(os.path.join(REPO, f)).read())}
        missing = sorted(f"{n} (in {f})" for f, n in used if n not in exported)
        if missing:
            fail("used but not exported: " + ", ".join(missing))
        print(f"ok   all {len({n for _, n in used})} metrics used by the dashboard and rules are exported")
        absent = [n for n in REQUIRED if n not in exported]
        if absent:
            fail("required metrics not exported: " + ", ".join(absent))
        print(f"ok   all {len(REQUIRED)} metrics issue 6 requires are exported")

        # every dashboard query, with the template variables filled in
        dash = json.load(open(os.path.join(REPO, "manifests/monitoring/dashboard.json")))

        def fill(expr, cluster, peer=".*"):
            for k, v in {"$__rate_interval": "10s", "$__interval": "1s", "$__range": "1m",
                         "$cluster": cluster, "$peer": peer, "$namespace": ".*", "$pod": ".*"}.items():
                expr = expr.replace(k, v)
            return expr

        def series(q):
            r = json.loads(get(f"http://127.0.0.1:{pp}/api/v1/query?" + urllib.parse.urlencode({"query": q})))
            if r["status"] != "success":
                fail(f"dashboard query failed: {q}: {r}")
            return r["data"]["result"]

        must_have_data = ("Replication lag per peer", "Bytes saved", "Conflict files")
        for panel in dash["panels"]:
            for t in panel["targets"]:
                got = series(fill(t["expr"], "test", "replica" if "peer" in t["expr"] else ".*"))
                if panel["title"].startswith(must_have_data) and not got:
                    fail(f"panel {panel['title']!r} returns no series for cluster test: {t['expr']}")
                if "peer" in t.get("legendFormat", "") and got and any(s["metric"].get("peer") not in (None, "replica") for s in got):
                    fail(f"panel {panel['title']!r}: $peer does not filter: {got}")
                elsewhere = series(fill(t["expr"], "no-such-cluster"))
                if elsewhere:
                    fail(f"panel {panel['title']!r} shows data for a cluster that does not exist: {t['expr']}")
        print(f"ok   all {sum(len(p['targets']) for p in dash['panels'])} dashboard queries run; lag per peer, "
              "bytes saved and conflicts have data; every query obeys $cluster")
        for v in dash["templating"]["list"]:
            q = (v.get("query") or {}).get("query", "") if isinstance(v.get("query"), dict) else ""
            if q.startswith("label_values("):
                inner, label = q[len("label_values("):-1].rsplit(",", 1)
                vals = {s["metric"].get(label.strip()) for s in series(fill(inner, "test"))}
                if not vals - {None}:
                    fail(f"variable ${v['name']} has no values: {q}")
        print("ok   every template variable has values (cluster, namespace, pod, peer)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
