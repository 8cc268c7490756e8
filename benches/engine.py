"""End-to-end engine benchmark: ferry primary -> replica on loopback vs cp -a.

Workloads (issue 2; issue 4's W1, W2, W3, W5):
  big    1 GiB in 4 incompressible files                        (W1)
  small  20,000 files of 4 KiB in 200 directories               (W2)
  tree   a real third-party source tree: the cargo registry's
         unpacked sources on this machine, if present           (W5)
  lag    a 4 KiB append every 10 ms for 20 s: lag until visible on the replica (W3)

For big, small and tree, each round times, alternately (A B C A B C):
  cp     `cp -a SRC DST` on the same filesystem (page cache warm)
  rsync  one-shot `rsync -a SRC rsync://127.0.0.1:PORT/...` to an rsync daemon
         on loopback (a fresh destination each round)
  ferry  the data appears in the primary's root at once (a rename from a staging
         copy on the same filesystem) until the primary has the replica's durable
         ack for it (every file fsynced on the replica), read from /metrics.
All data sets are created before any timing and nothing is deleted until the end
(the root filesystem does not reuse freshly freed inodes, which would skew runs).
"""

import argparse, hashlib, json, os, shutil, socket, statistics, subprocess, sys, tempfile, threading, time, urllib.request


def free_port():
    while True:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        p = u.getsockname()[1]
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p))
            t.close(); u.close()
            return p
        except OSError:
            u.close()


def metrics(port):
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith("#") or not line:
            continue
        name, _, val = line.rpartition(" ")
        out[name] = float(val)
    return out


def get(m, prefix):
    return sum(v for k, v in m.items() if k == prefix or k.startswith(prefix + "{"))


class Pair:
    def __init__(self, ferry, base):
        self.ferry, self.base = ferry, base
        run = lambda *a: subprocess.run([ferry, *a], check=True, capture_output=True)
        run("cert", "init", "--out", f"{base}/ca")
        run("cert", "issue", "--ca", f"{base}/ca", "--name", "primary", "--out", f"{base}/tls-p")
        run("cert", "issue", "--ca", f"{base}/ca", "--name", "replica", "--out", f"{base}/tls-r")
        self.proot, self.rroot = f"{base}/primary", f"{base}/replica"
        os.makedirs(self.proot); os.makedirs(self.rroot)
        self.rport, self.pport = free_port(), free_port()
        self.pm, self.rm = free_port(), free_port()
        env = dict(os.environ, FERRY_LOG_LEVEL="warn")
        self.r = subprocess.Popen([ferry, "run", "--root", self.rroot, "--name", "replica", "--tls-dir", f"{base}/tls-r",
                                   "--listen", f"127.0.0.1:{self.rport}", "--role", "replica", "--peer", f"primary=127.0.0.1:{self.pport}",
                                   "--metrics-addr", f"127.0.0.1:{self.rm}"], stderr=open(f"{base}/replica.log", "w"), env=env)
        self.p = subprocess.Popen([ferry, "run", "--root", self.proot, "--name", "primary", "--tls-dir", f"{base}/tls-p",
                                   "--listen", f"127.0.0.1:{self.pport}", "--role", "primary", "--peer", f"replica=127.0.0.1:{self.rport}",
                                   "--metrics-addr", f"127.0.0.1:{self.pm}"], stderr=open(f"{base}/primary.log", "w"), env=env)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                m = metrics(self.pm)
                if get(m, "ferry_peer_connected") == 1 and self.caught_up(m):
                    return
            except Exception:
                pass
            time.sleep(0.05)
        raise SystemExit("ferry pair did not start; see " + base)

    def caught_up(self, m=None):
        m = m or metrics(self.pm)
        return get(m, "ferry_unacked_batches") == 0 and get(m, "ferry_acked_seq") >= get(m, "ferry_sealed_seq")

    def wait_synced(self, since_seq, timeout=600):
        """Waits until a batch after `since_seq` is sealed and everything sealed is acked."""
        deadline = time.time() + timeout
        quiet_from = None
        while time.time() < deadline:
            m = metrics(self.pm)
            if get(m, "ferry_sealed_seq") > since_seq and self.caught_up(m):
                # sealed and acked; make sure no batch is about to be sealed (idle 5 ms)
                if quiet_from is None:
                    quiet_from = time.perf_counter()
                elif time.perf_counter() - quiet_from > 0.02:
                    return
            else:
                quiet_from = None
            time.sleep(0.002)
        raise SystemExit("replica did not catch up in time")

    def stop(self):
        for p in (self.p, self.r):
            p.terminate()
        for p in (self.p, self.r):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    def peak_rss(self):
        out = {}
        for name, p in (("primary", self.p), ("replica", self.r)):
            try:
                for line in open(f"/proc/{p.pid}/status"):
                    if line.startswith("VmHWM:"):
                        out[name] = int(line.split()[1]) / 1024
            except OSError:
                pass
        return out


def tree_digest(root):
    h = hashlib.blake2b()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(d, f)
            st = os.lstat(p)
            h.update(os.path.relpath(p, root).encode())
            h.update(str((st.st_size, st.st_mode, st.st_mtime_ns)).encode())
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    return h.hexdigest()


def make_big(path, size_mib):
    os.makedirs(path)
    for i in range(4):
        with open(f"{path}/blob-{i}.bin", "wb") as f:
            left = size_mib // 4 << 20
            while left:
                n = min(left, 8 << 20)
                f.write(os.urandom(n))
                left -= n


def make_small(path, files, dirs):
    per = files // dirs
    for d in range(dirs):
        os.makedirs(f"{path}/d{d:03}")
        for i in range(per):
            with open(f"{path}/d{d:03}/f{i:04}.dat", "wb") as f:
                f.write(os.urandom(4096))


class RsyncDaemon:
    """An rsync daemon on loopback whose module `bench` is the stage dir."""

    def __init__(self, base, stage):
        self.port = free_port()
        conf = f"{base}/rsyncd.conf"
        with open(conf, "w") as f:
            f.write(f"uid = root\ngid = root\nuse chroot = no\n[bench]\npath = {stage}\nread only = no\n")
        self.p = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={self.port}",
                                   "--address=127.0.0.1"], stderr=open(f"{base}/rsyncd.log", "w"))
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("rsync daemon did not start")

    def url(self, name):
        return f"rsync://127.0.0.1:{self.port}/bench/{name}"

    def stop(self):
        self.p.terminate()
        self.p.wait()


def copy_tree(src, dst, limit_bytes):
    """Copies regular files and dirs of `src` (no links) up to `limit_bytes`."""
    total = 0
    for d, dirs, files in os.walk(src):
        dirs.sort()
        rel = os.path.relpath(d, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in sorted(files):
            p = os.path.join(d, f)
            if not os.path.isfile(p) or os.path.islink(p):
                continue
            shutil.copy2(p, os.path.join(dst, rel, f))
            total += os.path.getsize(p)
            if total >= limit_bytes:
                return total
    return total


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_copy(pair, src, stage, name, rounds, rsyncd=None):
    """A B C A B C: cp -a, rsync (if a daemon is given) and ferry for the data set at src."""
    cp_times, ferry_times, rs_times = [], [], []
    for r in range(rounds):
        # staging copies first (untimed), so both sides start from warm page cache
        subprocess.run(["cp", "-a", src, f"{stage}/{name}-{r}"], check=True)
        cp_times.append(timed(lambda: subprocess.run(["cp", "-a", src, f"{stage}/cp-{name}-{r}"], check=True)))
        if rsyncd:
            rs_times.append(timed(lambda: subprocess.run(["rsync", "-a", src + "/", rsyncd.url(f"rs-{name}-{r}/")],
                                                         check=True)))
        seq = get(metrics(pair.pm), "ferry_sealed_seq")
        t0 = time.perf_counter()
        os.rename(f"{stage}/{name}-{r}", f"{pair.proot}/{name}-{r}")
        pair.wait_synced(seq)
        ferry_times.append(time.perf_counter() - t0)
        rs = f", rsync {rs_times[-1]:.3f} s" if rs_times else ""
        print(f"  {name} round {r}: cp -a {cp_times[-1]:.3f} s{rs}, ferry {ferry_times[-1]:.3f} s", flush=True)
    # correctness of the last round (untimed)
    a = tree_digest(f"{pair.proot}/{name}-{rounds-1}")
    b = tree_digest(f"{pair.rroot}/{name}-{rounds-1}")
    if a != b:
        raise SystemExit(f"{name}: replica differs from primary")
    return cp_times, ferry_times, rs_times


def bench_lag(pair, seconds, interval, size):
    path = f"{pair.proot}/append.log"
    rpath = f"{pair.rroot}/append.log"
    sent = []      # (size after append, time written)
    seen = {}      # size -> time first visible on the replica
    stop = threading.Event()

    def watch():
        last = -1
        while not stop.is_set():
            try:
                s = os.stat(rpath).st_size
            except FileNotFoundError:
                s = -1
            if s != last:
                seen.setdefault(s, time.perf_counter())
                last = s
            time.sleep(0.0005)

    t = threading.Thread(target=watch); t.start()
    block = b"x" * (size - 1) + b"\n"
    with open(path, "ab", buffering=0) as f:
        start = time.perf_counter()
        total = 0
        n = int(seconds / interval)
        for i in range(n):
            target = start + i * interval
            now = time.perf_counter()
            if target > now:
                time.sleep(target - now)
            f.write(block)
            total += size
            sent.append((total, time.perf_counter()))
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and max(seen, default=-1) < total:
        time.sleep(0.01)
    stop.set(); t.join()
    sizes = sorted(k for k in seen if k >= 0)
    lags = []
    torn = 0
    for s, tw in sent:
        # first replica size >= s: when this append became visible
        vis = next((seen[k] for k in sizes if k >= s), None)
        if vis is not None:
            lags.append(max(0.0, vis - tw))
    for k in sizes:
        if k % size:
            torn += 1
    lags.sort()
    q = lambda p: lags[min(len(lags) - 1, int(p * len(lags)))] * 1000
    return {"appends": len(sent), "measured": len(lags), "p50_ms": q(0.50), "p99_ms": q(0.99), "max_ms": lags[-1] * 1000,
            "torn_sizes_seen": torn}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller data, for a smoke run")
    a = ap.parse_args()
    big_mib, small_n, lag_s = (1024, 20000, 20.0) if not a.quick else (64, 2000, 3.0)
    base = tempfile.mkdtemp(prefix="ferry-bench-", dir=os.environ.get("FERRY_BENCH_DIR", "/var/tmp"))
    stage = f"{base}/stage"; os.makedirs(stage)
    print(f"bench dir {base}", flush=True)
    print("creating data sets", flush=True)
    make_big(f"{stage}/big-src", big_mib)
    make_small(f"{stage}/small-src", small_n, 200)
    reg = os.path.expanduser("~/.cargo/registry/src")
    tree_bytes = 0
    if os.path.isdir(reg):
        tree_bytes = copy_tree(reg, f"{stage}/tree-src", (400 if not a.quick else 20) << 20)
        tree_files = sum(len(f) for _, _, f in os.walk(f"{stage}/tree-src"))
    rsyncd = RsyncDaemon(base, stage) if shutil.which("rsync") else None
    if not rsyncd:
        print("rsync not found: no rsync baseline", flush=True)
    pair = Pair(os.path.abspath(a.ferry), base)
    res = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    try:
        print(f"W: {big_mib} MiB in 4 files", flush=True)
        cp_b, fe_b, rs_b = bench_copy(pair, f"{stage}/big-src", stage, "big", a.rounds, rsyncd)
        rss_big = pair.peak_rss()
        print(f"W: {small_n} files of 4 KiB in 200 directories", flush=True)
        cp_s, fe_s, rs_s = bench_copy(pair, f"{stage}/small-src", stage, "small", a.rounds, rsyncd)
        rss_small = pair.peak_rss()
        tree = None
        if tree_bytes:
            print(f"W: a real source tree (cargo registry sources): {tree_files} files, {tree_bytes >> 20} MiB", flush=True)
            cp_t, fe_t, rs_t = bench_copy(pair, f"{stage}/tree-src", stage, "tree", a.rounds, rsyncd)
            tree = {"files": tree_files, "mib": tree_bytes / (1 << 20), "cp_s": statistics.median(cp_t),
                    "ferry_s": statistics.median(fe_t), "rsync_s": statistics.median(rs_t) if rs_t else None,
                    "rounds": {"cp": cp_t, "ferry": fe_t, "rsync": rs_t}}
        print(f"W: a 4 KiB append every 10 ms for {lag_s:.0f} s", flush=True)
        lag = bench_lag(pair, lag_s, 0.010, 4096)
        med = statistics.median
        mr = lambda v: med(v) if v else None
        res.update({
            "big": {"mib": big_mib, "cp_s": med(cp_b), "ferry_s": med(fe_b), "rsync_s": mr(rs_b), "ratio": med(fe_b) / med(cp_b),
                    "ferry_mib_s": big_mib / med(fe_b), "rounds": {"cp": cp_b, "ferry": fe_b, "rsync": rs_b}},
            "small": {"files": small_n, "cp_s": med(cp_s), "ferry_s": med(fe_s), "rsync_s": mr(rs_s), "ratio": med(fe_s) / med(cp_s),
                      "ferry_files_s": small_n / med(fe_s), "rounds": {"cp": cp_s, "ferry": fe_s, "rsync": rs_s}},
            "tree": tree,
            "lag": lag,
            "peak_rss_mib": {"after_big": rss_big, "after_small": rss_small},
        })
    finally:
        pair.stop()
        if rsyncd:
            rsyncd.stop()
    os.makedirs("bench-out", exist_ok=True)
    json.dump(res, open("bench-out/engine.json", "w"), indent=2)
    b, s, l = res["big"], res["small"], res["lag"]
    print()
    rsf = lambda w: f"{w['rsync_s']:.3f} s | {w['ferry_s'] / w['rsync_s']:.2f}" if w.get("rsync_s") else "- | -"
    print("| workload | cp -a (median) | rsync to a daemon (median) | ferry (median) | ferry / cp -a | ferry / rsync | throughput |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {b['mib']} MiB in 4 files | {b['cp_s']:.3f} s | {rsf(b).split(' | ')[0]} | {b['ferry_s']:.3f} s | {b['ratio']:.2f} | {rsf(b).split(' | ')[1]} | {b['ferry_mib_s']:.0f} MiB/s |")
    print(f"| {s['files']} × 4 KiB files | {s['cp_s']:.3f} s | {rsf(s).split(' | ')[0]} | {s['ferry_s']:.3f} s | {s['ratio']:.2f} | {rsf(s).split(' | ')[1]} | {s['ferry_files_s']:.0f} files/s |")
    t = res.get("tree")
    if t:
        print(f"| source tree, {t['files']} files, {t['mib']:.0f} MiB | {t['cp_s']:.3f} s | {rsf(t).split(' | ')[0]} | {t['ferry_s']:.3f} s | {t['ferry_s'] / t['cp_s']:.2f} | {rsf(t).split(' | ')[1]} | {t['files'] / t['ferry_s']:.0f} files/s |")
    print(f"| 4 KiB append / 10 ms, {l['appends']} appends | | p50 {l['p50_ms']:.1f} ms, p99 {l['p99_ms']:.1f} ms, max {l['max_ms']:.1f} ms | | torn sizes seen: {l['torn_sizes_seen']} |")
    print(f"peak RSS (MiB): {res['peak_rss_mib']}")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
