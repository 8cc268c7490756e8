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
         ack for it (every file fsynced on the replica), read from /metrics. Each
         round on a fresh pair: a replica holding an earlier round's copy of the same
         data would rebuild it from its own chunks (FileCopy) instead of receiving it.
All data sets are created before any timing and nothing is deleted until the end
(the root filesystem does not reuse freshly freed inodes, which would skew runs).

Issue 4's other workloads:
  w4     a 1 GiB incompressible file replicated, then 1 MiB overwritten in place in
         its middle (pwrite, no truncation): bytes on the wire (ferry's content bytes
         sent less what compression saved) and time from the write until the replica's
         file has the primary's size and mtime (then checked by hash, untimed);
         baseline `rsync -a -I --inplace --no-whole-file` of the same edit to the daemon.
  w2w    the application's own write time for W2 (20,000 x 4 KiB files in 200
         dirs): no ferry process at all, vs into the root of a running pair
         (A B A B, a fresh pair per B round).
  m      idle RSS (VmRSS) of both daemons after startup with an empty root; peak RSS
         (VmHWM, reset before each workload) during w1 and w2 when they run.
  w6     1 GiB through an emulated WAN link (100 ms RTT, 0.1 % loss; benches/wan/):
         ferry primary and replica in two network namespaces, vs `rsync -a` over TCP
         to a daemon in the replica's namespace through the same link.
Select with --only (ids: w1 w2 w5 w3 w4 w2w m w6; default all).
"""

import argparse, ctypes, hashlib, json, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time, urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = ["w1", "w2", "w5", "w3", "w4", "w2w", "m", "w6"]


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


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


class netns:
    """Runs a block with the calling thread in network namespace `name` (None: stay)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        if not self.name:
            return
        self.orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {self.name}")
        finally:
            os.close(fd)

    def __exit__(self, *exc):
        if not self.name:
            return
        if _libc.setns(self.orig, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(self.orig)


def metrics(port, ns=None):
    with netns(ns):
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


def proc_status(pid, field):
    """A /proc/PID/status field in MiB (VmRSS, VmHWM), None if gone."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Pair:
    """A primary and a replica; on loopback, or with `net` (from benches/wan/wan.sh
    up) each in its own network namespace, talking through the emulated link."""

    def __init__(self, ferry, base, net=None):
        self.ferry, self.base, self.net = ferry, base, net
        run = lambda *a: subprocess.run([ferry, *a], check=True, capture_output=True)
        os.makedirs(base, exist_ok=True)
        run("cert", "init", "--out", f"{base}/ca")
        run("cert", "issue", "--ca", f"{base}/ca", "--name", "primary", "--out", f"{base}/tls-p")
        run("cert", "issue", "--ca", f"{base}/ca", "--name", "replica", "--out", f"{base}/tls-r")
        self.proot, self.rroot = f"{base}/primary", f"{base}/replica"
        os.makedirs(self.proot); os.makedirs(self.rroot)
        self.rport, self.pport = free_port(), free_port()
        self.pm, self.rm = free_port(), free_port()
        self.pns, self.rns = (net["NS_A"], net["NS_B"]) if net else (None, None)
        pip, rip = (net["IP_A"], net["IP_B"]) if net else ("127.0.0.1", "127.0.0.1")
        wrap = lambda ns: ["ip", "netns", "exec", ns] if ns else []  # `ip netns exec` execs: same pid
        env = dict(os.environ, FERRY_LOG_LEVEL="warn")
        # a short shutdown grace: stop() comes after the last ack, or on an abort
        self.r = subprocess.Popen([*wrap(self.rns), ferry, "run", "--root", self.rroot, "--name", "replica", "--tls-dir", f"{base}/tls-r",
                                   "--listen", f"{rip}:{self.rport}", "--role", "replica", "--peer", f"primary={pip}:{self.pport}",
                                   "--metrics-addr", f"127.0.0.1:{self.rm}", "--shutdown-grace-secs", "5"], stderr=open(f"{base}/replica.log", "w"), env=env)
        self.p = subprocess.Popen([*wrap(self.pns), ferry, "run", "--root", self.proot, "--name", "primary", "--tls-dir", f"{base}/tls-p",
                                   "--listen", f"{pip}:{self.pport}", "--role", "primary", "--peer", f"replica={rip}:{self.rport}",
                                   "--metrics-addr", f"127.0.0.1:{self.pm}", "--shutdown-grace-secs", "5"], stderr=open(f"{base}/primary.log", "w"), env=env)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                m = self.metrics()
                if get(m, "ferry_peer_connected") == 1 and self.caught_up(m):
                    return
            except Exception:
                pass
            time.sleep(0.05)
        self.stop()
        raise SystemExit("ferry pair did not start; see " + base)

    def metrics(self):
        """The primary's /metrics."""
        return metrics(self.pm, self.pns)

    def caught_up(self, m=None):
        m = m or self.metrics()
        return get(m, "ferry_unacked_batches") == 0 and get(m, "ferry_acked_seq") >= get(m, "ferry_sealed_seq")

    def wait_synced(self, since_seq, timeout=600, poll=0.002):
        """Waits until a batch after `since_seq` is sealed and everything sealed is acked."""
        deadline = time.time() + timeout
        quiet_from = None
        while time.time() < deadline:
            m = self.metrics()
            if get(m, "ferry_sealed_seq") > since_seq and self.caught_up(m):
                # sealed and acked; make sure no batch is about to be sealed (idle 20 ms)
                if quiet_from is None:
                    quiet_from = time.perf_counter()
                elif time.perf_counter() - quiet_from > 0.02:
                    return
            else:
                quiet_from = None
            time.sleep(poll)
        raise SystemExit("replica did not catch up in time")

    def stop(self):
        for p in (self.p, self.r):
            p.terminate()
        for p in (self.p, self.r):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    def rss(self, field):
        return {name: proc_status(p.pid, field) for name, p in (("primary", self.p), ("replica", self.r))}

    def peak_rss(self):
        return self.rss("VmHWM")


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
    """An rsync daemon whose module `bench` is the stage dir: on loopback, or in
    network namespace `ns` listening on `addr`."""

    def __init__(self, base, stage, ns=None, addr="127.0.0.1"):
        self.port, self.addr, self.ns = free_port(), addr, ns
        conf = f"{base}/rsyncd.conf"
        with open(conf, "w") as f:
            f.write(f"uid = root\ngid = root\nuse chroot = no\n[bench]\npath = {stage}\nread only = no\n")
        wrap = ["ip", "netns", "exec", ns] if ns else []
        self.p = subprocess.Popen([*wrap, "rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={self.port}",
                                   f"--address={addr}"], stderr=open(f"{base}/rsyncd.log", "w"))
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with netns(ns):
                    socket.create_connection((addr, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit("rsync daemon did not start")

    def url(self, name):
        return f"rsync://{self.addr}:{self.port}/bench/{name}"

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


def bench_copy(new_pair, src, stage, name, rounds, rsyncd=None):
    """A B C A B C: cp -a, rsync (if a daemon is given) and ferry for the data set at src.

    Every ferry round runs on a fresh pair (`new_pair(label)`): a replica that
    still held an earlier round's copy of the same data would get it by chunk
    reuse (FileCopy) instead of over the wire. Returns the times and each
    daemon's peak RSS (VmHWM) over the rounds.
    """
    cp_times, ferry_times, rs_times = [], [], []
    peak = {}
    for r in range(rounds):
        # staging copies first (untimed), so both sides start from warm page cache
        subprocess.run(["cp", "-a", src, f"{stage}/{name}-{r}"], check=True)
        cp_times.append(timed(lambda: subprocess.run(["cp", "-a", src, f"{stage}/cp-{name}-{r}"], check=True)))
        if rsyncd:
            rs_times.append(timed(lambda: subprocess.run(["rsync", "-a", src + "/", rsyncd.url(f"rs-{name}-{r}/")],
                                                         check=True)))
        pair = new_pair(f"{name}-{r}")
        try:
            m0 = pair.metrics()
            seq = get(m0, "ferry_sealed_seq")
            t0 = time.perf_counter()
            os.rename(f"{stage}/{name}-{r}", f"{pair.proot}/{name}-{r}")
            pair.wait_synced(seq)
            ferry_times.append(time.perf_counter() - t0)
            m1 = pair.metrics()
            for k, v in pair.peak_rss().items():
                peak[k] = max(peak.get(k) or 0, v or 0)
            if r == rounds - 1:  # correctness of the last round (untimed)
                if tree_digest(f"{pair.proot}/{name}-{r}") != tree_digest(f"{pair.rroot}/{name}-{r}"):
                    raise SystemExit(f"{name}: replica differs from primary")
        finally:
            pair.stop()
        saved = lambda m: {k[len('ferry_bytes_saved_total{reason="'):-2]: v for k, v in m.items()
                           if k.startswith("ferry_bytes_saved_total{")}
        s0, s1 = saved(m0), saved(m1)
        sv = ", ".join(f"{k} {(s1[k] - s0.get(k, 0)) / (1 << 20):.1f}" for k in sorted(s1) if s1[k] - s0.get(k, 0))
        rs = f", rsync {rs_times[-1]:.3f} s" if rs_times else ""
        print(f"  {name} round {r}: cp -a {cp_times[-1]:.3f} s{rs}, ferry {ferry_times[-1]:.3f} s"
              f" (sent {(get(m1, 'ferry_bytes_sent_total') - get(m0, 'ferry_bytes_sent_total')) / (1 << 20):.1f} MiB"
              f"{'; MiB saved: ' + sv if sv else ''})", flush=True)
    return cp_times, ferry_times, rs_times, peak


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


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


def write_random(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n


def rsync_stats(out):
    """(bytes sent, bytes received) from `rsync --stats` output."""
    num = lambda k: int(re.search(k + r":\s*([\d,]+)", out).group(1).replace(",", ""))
    return num("Total bytes sent"), num("Total bytes received")


def wire_bytes(m):
    """ferry's content bytes on the wire: sent, less what compression saved."""
    return get(m, "ferry_bytes_sent_total") - m.get('ferry_bytes_saved_total{reason="compression"}', 0.0)


class UdpCounter:
    """Counts the IP bytes of UDP packets from and to a local port (nftables,
    output hook: every packet once, loopback included): QUIC on the wire."""

    def __init__(self, port):
        self.table = f"ferry_bench_{os.environ.get('FERRY_WAN_TAG') or os.getpid()}"
        self.ok = os.geteuid() == 0 and shutil.which("nft") is not None
        if not self.ok:
            return
        nft = lambda *a: subprocess.run(["nft", *a], check=True, capture_output=True)
        try:
            nft("add", "table", "inet", self.table)
            nft("add", "chain", "inet", self.table, "out", "{ type filter hook output priority 0; policy accept; }")
            nft("add", "rule", "inet", self.table, "out", "udp", "sport", str(port), "counter")
            nft("add", "rule", "inet", self.table, "out", "udp", "dport", str(port), "counter")
        except (subprocess.CalledProcessError, OSError):
            self.close()
            self.ok = False

    def read(self):
        if not self.ok:
            return None
        out = subprocess.run(["nft", "-j", "list", "table", "inet", self.table], check=True, capture_output=True, text=True).stdout
        total = 0
        for item in json.loads(out)["nftables"]:
            for e in item.get("rule", {}).get("expr", []):
                if "counter" in e:
                    total += e["counter"]["bytes"]
        return total

    def close(self):
        subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)


def idle_rss(ferry, base, settle=3.0):
    """M: VmRSS of both daemons of a fresh pair with an empty root, once connected and settled."""
    pair = Pair(ferry, base)
    try:
        time.sleep(settle)
        return pair.rss("VmRSS")
    finally:
        pair.stop()


def bench_w4(pair, stage, size_mib, edit, rounds, rsyncd):
    """W4: `edit` bytes overwritten in place in the middle of a replicated file."""
    name = "w4.bin"
    pfile, rfile = f"{pair.proot}/{name}", f"{pair.rroot}/{name}"
    write_random(f"{stage}/{name}", size_mib << 20)
    seq = get(pair.metrics(), "ferry_sealed_seq")
    os.rename(f"{stage}/{name}", pfile)
    pair.wait_synced(seq)
    if rsyncd:  # the daemon's copy of the same old version (untimed)
        os.makedirs(f"{stage}/w4", exist_ok=True)
        subprocess.run(["rsync", "-a", pfile, rsyncd.url("w4/")], check=True)
    time.sleep(1)
    off = (size_mib << 20) // 2 - edit // 2
    out = {"ferry_s": [], "ferry_wire_bytes": [], "ferry_udp_bytes": [], "rsync_s": [], "rsync_wire_bytes": []}
    udp = UdpCounter(pair.pport)
    try:
        for r in range(rounds):
            w4_round(pair, pfile, rfile, off, edit, r, rsyncd, udp, out)
    finally:
        udp.close()
    return out


def w4_round(pair, pfile, rfile, off, edit, r, rsyncd, udp, out):
    """One W4 round: the edit, the wait for the replica, then the same edit by rsync."""
    patch = os.urandom(edit)
    u0 = udp.read()
    m0 = pair.metrics()
    seq = get(m0, "ferry_sealed_seq")
    t0 = time.perf_counter()
    fd = os.open(pfile, os.O_WRONLY)
    try:
        os.pwrite(fd, patch, off)
    finally:
        os.close(fd)
    st = os.stat(pfile)
    want = (st.st_size, st.st_mtime_ns)
    # fast check: the replica's size and mtime (set last, once the patch is durable)
    deadline = time.perf_counter() + 120
    while True:
        try:
            rs = os.stat(rfile)
            if (rs.st_size, rs.st_mtime_ns) == want:
                break
        except FileNotFoundError:
            pass
        if time.perf_counter() > deadline:
            raise SystemExit("w4: replica did not converge in 120 s")
        time.sleep(0.0005)
    t = time.perf_counter() - t0
    pair.wait_synced(seq)
    wire = wire_bytes(pair.metrics()) - wire_bytes(m0)
    if file_digest(pfile) != file_digest(rfile):  # then the content (untimed)
        raise SystemExit("w4: replica's file differs from the primary's")
    u = udp.read() - u0 if u0 is not None else None
    out["ferry_s"].append(t); out["ferry_wire_bytes"].append(wire); out["ferry_udp_bytes"].append(u)
    line = f"  w4 round {r}: ferry {t:.3f} s, {wire / (1 << 20):.2f} MiB on the wire"
    if u is not None:
        line += f" ({u / (1 << 20):.2f} MiB of UDP both ways)"
    if rsyncd:
        t0 = time.perf_counter()
        # -I: rsync's quick check compares whole seconds of mtime, and rounds run within one
        res = subprocess.run(["rsync", "-a", "-I", "--inplace", "--no-whole-file", "--stats", pfile, rsyncd.url("w4/")],
                             check=True, capture_output=True, text=True)
        t = time.perf_counter() - t0
        sent, recv = rsync_stats(res.stdout)
        out["rsync_s"].append(t); out["rsync_wire_bytes"].append(sent + recv)
        line += f"; rsync {t:.3f} s, {(sent + recv) / (1 << 20):.2f} MiB (sent {sent:,}, received {recv:,})"
    print(line, flush=True)


def bench_w2w(ferry, base, files, dirs, rounds):
    """W2w: the app's own time to write W2, without ferry / into a running pair's root."""
    per = files // dirs
    payload = memoryview(os.urandom(files * 4096))  # distinct content per file (no dedup)

    def app(dst):
        t0 = time.perf_counter()
        k = 0
        for d in range(dirs):
            os.makedirs(f"{dst}/d{d:03}")
            for i in range(per):
                with open(f"{dst}/d{d:03}/f{i:04}.dat", "wb") as f:
                    f.write(payload[k:k + 4096])
                k += 4096
        return time.perf_counter() - t0

    def idle_priority(pid):
        # the replica stands in for one in another cluster: here it shares
        # the app's two cores, so it runs at idle priority (CPU and I/O)
        for t in os.listdir(f"/proc/{pid}/task"):
            subprocess.run(["renice", "-n", "19", "-p", t], capture_output=True)
        subprocess.run(["ionice", "-c", "3", "-p", str(pid)], capture_output=True)

    plain, with_ferry, repl, with_remote = [], [], [], []
    for r in range(rounds):
        os.sync()
        plain.append(app(f"{base}/plain-{r}"))
        os.sync()
        pair = Pair(ferry, f"{base}/pair-{r}")
        try:
            seq = get(pair.metrics(), "ferry_sealed_seq")
            t0 = time.perf_counter()
            with_ferry.append(app(f"{pair.proot}/data"))
            pair.wait_synced(seq)
            repl.append(time.perf_counter() - t0)
        finally:
            pair.stop()
        os.sync()
        pair = Pair(ferry, f"{base}/pair-idle-{r}")
        try:
            idle_priority(pair.r.pid)
            seq = get(pair.metrics(), "ferry_sealed_seq")
            with_remote.append(app(f"{pair.proot}/data"))
            pair.wait_synced(seq)
        finally:
            pair.stop()
        print(f"  w2w round {r}: without ferry {plain[-1]:.3f} s, with ferry {with_ferry[-1]:.3f} s "
              f"(replica identical {repl[-1]:.3f} s after the first write); "
              f"with ferry, replica at idle priority {with_remote[-1]:.3f} s", flush=True)
    return plain, with_ferry, repl, with_remote


def link_bytes(net):
    """Bytes through ns A's end of the emulated link, both directions."""
    out = subprocess.run(["ip", "-n", net["NS_A"], "-j", "-s", "link", "show", "dev", net["DEV_A"]],
                         check=True, capture_output=True, text=True).stdout
    st = json.loads(out)[0]["stats64"]
    return st["rx"]["bytes"] + st["tx"]["bytes"]


def bench_w6(ferry, base, stage, mib, rounds, a):
    """W6: ferry vs rsync over TCP through an emulated WAN link (benches/wan/wan.sh)."""
    tag = os.environ.get("FERRY_WAN_TAG") or str(os.getpid())
    wan = f"{HERE}/wan/wan.sh"
    timeout = a.w6_timeout
    up = subprocess.run(["bash", wan, "up", tag, str(a.w6_delay_ms), str(a.w6_loss_ppm), str(a.w6_rate_mbit),
                         str(int(timeout * 2 * rounds + 600))], capture_output=True, text=True, timeout=120)
    res = {"mib": mib}
    try:
        if up.returncode != 0:
            raise SystemExit(f"w6: could not set up the link: {up.stderr.strip()}")
        net = dict(l.split("=", 1) for l in up.stdout.splitlines() if "=" in l)
        res.update({"mode": net["MODE"], "why": net["WHY"], "one_way_delay_ms": a.w6_delay_ms,
                    "loss_ppm": a.w6_loss_ppm, "rate_mbit": a.w6_rate_mbit or None})
        res["tcp_congestion_control"] = subprocess.run(["ip", "netns", "exec", net["NS_A"], "sysctl", "-n", "net.ipv4.tcp_congestion_control"],
                                                       capture_output=True, text=True).stdout.strip()
        print(f"  link: {net['MODE']} ({net['WHY']}); rsync's TCP congestion control: {res['tcp_congestion_control']}", flush=True)
        ping = subprocess.run(["bash", wan, "ping", tag, "20"], capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"= [\d.]+/([\d.]+)/", ping)
        res["ping_rtt_ms"] = float(m.group(1)) if m else None
        res["ping"] = ping.strip()
        print(f"  ping: {' / '.join(ping.strip().splitlines())}", flush=True)
        pair = rsyncd = None
        fe, rs, fe_link, rs_link = [], [], [], []
        try:
            pair = Pair(ferry, f"{base}/w6", net)
            if shutil.which("rsync"):
                os.makedirs(f"{base}/w6/rsync-dst")
                rsyncd = RsyncDaemon(f"{base}/w6", f"{base}/w6/rsync-dst", net["NS_B"], net["IP_B"])
            for r in range(rounds):
                # fresh content every round: the replica holds the earlier rounds' chunks
                name = f"w6-{r}.bin"
                write_random(f"{stage}/{name}", mib << 20)
                seq = get(pair.metrics(), "ferry_sealed_seq")
                b0 = link_bytes(net)
                t0 = time.perf_counter()
                os.rename(f"{stage}/{name}", f"{pair.proot}/{name}")
                pair.wait_synced(seq, timeout=timeout, poll=0.02)
                fe.append(time.perf_counter() - t0); fe_link.append(link_bytes(net) - b0)
                line = f"  w6 round {r}: ferry {fe[-1]:.1f} s ({mib / fe[-1]:.2f} MiB/s)"
                if rsyncd:
                    b0 = link_bytes(net)
                    t0 = time.perf_counter()
                    try:
                        subprocess.run(["ip", "netns", "exec", net["NS_A"], "rsync", "-a", f"{pair.proot}/{name}",
                                        rsyncd.url(name)], check=True, timeout=timeout)
                        rs.append(time.perf_counter() - t0); rs_link.append(link_bytes(net) - b0)
                        line += f", rsync {rs[-1]:.1f} s ({mib / rs[-1]:.2f} MiB/s)"
                    except subprocess.TimeoutExpired:
                        line += f", rsync did not finish in {timeout} s"
                print(line, flush=True)
            if file_digest(f"{pair.proot}/w6-{rounds - 1}.bin") != file_digest(f"{pair.rroot}/w6-{rounds - 1}.bin"):
                raise SystemExit("w6: replica differs from primary")
        finally:
            if pair:
                pair.stop()
            if rsyncd:
                rsyncd.stop()
        med = statistics.median
        res.update({"ferry_s": med(fe), "ferry_mib_s": mib / med(fe), "ferry_link_bytes": med(fe_link),
                    "rsync_s": med(rs) if rs else None, "rsync_mib_s": mib / med(rs) if rs else None,
                    "rsync_link_bytes": med(rs_link) if rs_link else None,
                    "ratio": (mib / med(fe)) / (mib / med(rs)) if rs else None,
                    "rounds": {"ferry": fe, "rsync": rs}})
    finally:
        down = subprocess.run(["bash", wan, "down", tag], capture_output=True, text=True, timeout=120)
        res["link_counters"] = [l for l in down.stderr.splitlines() if l.startswith("relay ")]
        for l in res["link_counters"]:
            print(f"  {l}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smaller data, for a smoke run")
    ap.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated workloads: " + " ".join(WORKLOADS))
    ap.add_argument("--w6-mib", type=int, default=None, help="W6 data size in MiB (default 1024, 16 with --quick)")
    ap.add_argument("--w6-rounds", type=int, default=1, help="W6 rounds (each moves the data twice over the slow link)")
    ap.add_argument("--w6-delay-ms", type=float, default=50, help="W6 one-way delay (RTT is twice this)")
    ap.add_argument("--w6-loss-ppm", type=int, default=1000, help="W6 random loss per direction, per million packets")
    ap.add_argument("--w6-rate-mbit", type=float, default=0, help="W6 bottleneck rate (0: none, as netem without rate)")
    ap.add_argument("--w6-timeout", type=float, default=3600, help="W6: give up on one transfer after this many seconds")
    a = ap.parse_args()
    only = {w.strip().lower() for w in a.only.split(",") if w.strip()}
    if only - set(WORKLOADS):
        ap.error(f"unknown workloads {sorted(only - set(WORKLOADS))}; known: {' '.join(WORKLOADS)}")
    # a SIGTERM runs the finally blocks (stop daemons, tear the emulated link down)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    big_mib, small_n, lag_s = (1024, 20000, 20.0) if not a.quick else (64, 2000, 3.0)
    w4_mib, w6_mib = (1024, 1024) if not a.quick else (64, 16)
    w6_mib = a.w6_mib or w6_mib
    ferry = os.path.abspath(a.ferry)
    base = tempfile.mkdtemp(prefix="ferry-bench-", dir=os.environ.get("FERRY_BENCH_DIR", "/var/tmp"))
    stage = f"{base}/stage"; os.makedirs(stage)
    print(f"bench dir {base}; workloads {' '.join(w for w in WORKLOADS if w in only)}", flush=True)
    res = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}, "quick": a.quick}
    med = statistics.median
    mr = lambda v: med(v) if v else None
    copy_sets = [w for w in ("w1", "w2", "w5") if w in only]
    if copy_sets or "w3" in only or "w4" in only:
        print("creating data sets", flush=True)
        if "w1" in only:
            make_big(f"{stage}/big-src", big_mib)
        if "w2" in only:
            make_small(f"{stage}/small-src", small_n, 200)
        reg = os.path.expanduser("~/.cargo/registry/src")
        tree_bytes = 0
        if "w5" in only and os.path.isdir(reg):
            tree_bytes = copy_tree(reg, f"{stage}/tree-src", (400 if not a.quick else 20) << 20)
            tree_files = sum(len(f) for _, _, f in os.walk(f"{stage}/tree-src"))
        rsyncd = RsyncDaemon(base, stage) if shutil.which("rsync") else None
        if not rsyncd:
            print("rsync not found: no rsync baseline", flush=True)
        new_pair = lambda label: Pair(ferry, f"{base}/pair-{label}")
        pair = None  # one pair for w3 and w4, made when first needed
        peak = {}
        try:
            if "w1" in only:
                print(f"W1: {big_mib} MiB in 4 files", flush=True)
                cp_b, fe_b, rs_b, peak["w1"] = bench_copy(new_pair, f"{stage}/big-src", stage, "big", a.rounds, rsyncd)
                res["big"] = {"mib": big_mib, "cp_s": med(cp_b), "ferry_s": med(fe_b), "rsync_s": mr(rs_b),
                              "ratio": med(fe_b) / med(cp_b), "ferry_mib_s": big_mib / med(fe_b),
                              "rounds": {"cp": cp_b, "ferry": fe_b, "rsync": rs_b}}
            if "w2" in only:
                print(f"W2: {small_n} files of 4 KiB in 200 directories", flush=True)
                cp_s, fe_s, rs_s, peak["w2"] = bench_copy(new_pair, f"{stage}/small-src", stage, "small", a.rounds, rsyncd)
                res["small"] = {"files": small_n, "cp_s": med(cp_s), "ferry_s": med(fe_s), "rsync_s": mr(rs_s),
                                "ratio": med(fe_s) / med(cp_s), "ferry_files_s": small_n / med(fe_s),
                                "rounds": {"cp": cp_s, "ferry": fe_s, "rsync": rs_s}}
            if "w5" in only and tree_bytes:
                print(f"W5: a real source tree (cargo registry sources): {tree_files} files, {tree_bytes >> 20} MiB", flush=True)
                cp_t, fe_t, rs_t, _ = bench_copy(new_pair, f"{stage}/tree-src", stage, "tree", a.rounds, rsyncd)
                res["tree"] = {"files": tree_files, "mib": tree_bytes / (1 << 20), "cp_s": med(cp_t),
                               "ferry_s": med(fe_t), "rsync_s": mr(rs_t), "rounds": {"cp": cp_t, "ferry": fe_t, "rsync": rs_t}}
            elif "w5" in only:
                print("W5: no cargo registry sources on this machine: skipped", flush=True)
            if "w3" in only or "w4" in only:
                pair = new_pair("w3-w4")
            if "w3" in only:
                print(f"W3: a 4 KiB append every 10 ms for {lag_s:.0f} s", flush=True)
                res["lag"] = bench_lag(pair, lag_s, 0.010, 4096)
            if "w4" in only:
                print(f"W4: 1 MiB overwritten in the middle of a replicated {w4_mib} MiB file", flush=True)
                w4 = bench_w4(pair, stage, w4_mib, 1 << 20, a.rounds, rsyncd)
                res["w4"] = {"file_mib": w4_mib, "edit_mib": 1, "ferry_s": med(w4["ferry_s"]),
                             "ferry_wire_mib": med(w4["ferry_wire_bytes"]) / (1 << 20), "rsync_s": mr(w4["rsync_s"]),
                             "ferry_udp_mib": med(w4["ferry_udp_bytes"]) / (1 << 20) if None not in w4["ferry_udp_bytes"] else None,
                             "rsync_wire_mib": mr(w4["rsync_wire_bytes"]) / (1 << 20) if w4["rsync_wire_bytes"] else None,
                             "rounds": w4}
            if peak:
                res["peak_rss_mib"] = peak
        finally:
            if pair:
                pair.stop()
            if rsyncd:
                rsyncd.stop()
    if "m" in only:
        print("M: idle RSS after startup, empty root", flush=True)
        res["idle_rss_mib"] = idle_rss(ferry, f"{base}/idle")
        print(f"  {res['idle_rss_mib']}", flush=True)
    if "w2w" in only:
        print(f"W2w: the app's own write time for {small_n} x 4 KiB files in 200 dirs, without / with ferry", flush=True)
        plain, wf, repl, wr = bench_w2w(ferry, f"{base}/w2w", small_n, 200, a.rounds)
        res["w2w"] = {"files": small_n, "without_s": med(plain), "with_s": med(wf), "ratio": med(wf) / med(plain),
                      "replicated_s": med(repl), "with_idle_replica_s": med(wr),
                      "ratio_idle_replica": med(wr) / med(plain),
                      "rounds": {"without": plain, "with": wf, "replicated": repl, "with_idle_replica": wr}}
    if "w6" in only:
        print(f"W6: {w6_mib} MiB through an emulated WAN link", flush=True)
        if os.geteuid() != 0 or not shutil.which("ip"):
            print("  needs root and iproute2: skipped", flush=True)
        else:
            res["w6"] = bench_w6(ferry, base, stage, w6_mib, a.w6_rounds, a)
    os.makedirs("bench-out", exist_ok=True)
    json.dump(res, open("bench-out/engine.json", "w"), indent=2)
    report(res)
    shutil.rmtree(base, ignore_errors=True)


def report(res):
    print()
    rsf = lambda w: (f"{w['rsync_s']:.3f} s", f"{w['ferry_s'] / w['rsync_s']:.2f}") if w.get("rsync_s") else ("-", "-")
    rows = []
    if "big" in res:
        b = res["big"]
        rows.append(f"| W1 {b['mib']} MiB in 4 files | {b['cp_s']:.3f} s | {rsf(b)[0]} | {b['ferry_s']:.3f} s | {b['ratio']:.2f} | {rsf(b)[1]} | {b['ferry_mib_s']:.0f} MiB/s |")
    if "small" in res:
        s = res["small"]
        rows.append(f"| W2 {s['files']} × 4 KiB files | {s['cp_s']:.3f} s | {rsf(s)[0]} | {s['ferry_s']:.3f} s | {s['ratio']:.2f} | {rsf(s)[1]} | {s['ferry_files_s']:.0f} files/s |")
    if res.get("tree"):
        t = res["tree"]
        rows.append(f"| W5 source tree, {t['files']} files, {t['mib']:.0f} MiB | {t['cp_s']:.3f} s | {rsf(t)[0]} | {t['ferry_s']:.3f} s | {t['ferry_s'] / t['cp_s']:.2f} | {rsf(t)[1]} | {t['files'] / t['ferry_s']:.0f} files/s |")
    if rows:
        print("| workload | cp -a (median) | rsync to a daemon (median) | ferry (median) | ferry / cp -a | ferry / rsync | throughput |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows))
    if "lag" in res:
        l = res["lag"]
        print(f"W3 4 KiB append / 10 ms, {l['appends']} appends: p50 {l['p50_ms']:.1f} ms, p99 {l['p99_ms']:.1f} ms, "
              f"max {l['max_ms']:.1f} ms, torn sizes seen: {l['torn_sizes_seen']}")
    if "w4" in res:
        w = res["w4"]
        rs = f"; rsync --inplace --no-whole-file {w['rsync_s']:.3f} s, {w['rsync_wire_mib']:.2f} MiB" if w.get("rsync_s") else ""
        udp = f" ({w['ferry_udp_mib']:.2f} MiB of UDP both ways)" if w.get("ferry_udp_mib") is not None else ""
        print(f"W4 1 MiB edit of a {w['file_mib']} MiB file (medians): ferry {w['ferry_s']:.3f} s, "
              f"{w['ferry_wire_mib']:.2f} MiB of content on the wire{udp} (targets 0.5 s, 1.5 MiB){rs}")
    if "w2w" in res:
        w = res["w2w"]
        print(f"W2w app write time for {w['files']} files (medians): without ferry {w['without_s']:.3f} s, "
              f"with ferry {w['with_s']:.3f} s, ratio {w['ratio']:.2f} (target 1.2); "
              f"replica at idle priority (as if in another cluster) {w['with_idle_replica_s']:.3f} s, "
              f"ratio {w['ratio_idle_replica']:.2f}")
    if "peak_rss_mib" in res:
        print(f"M peak RSS (VmHWM, MiB) during each workload: {res['peak_rss_mib']}")
    if "idle_rss_mib" in res:
        print(f"M idle RSS (VmRSS, MiB): {res['idle_rss_mib']}")
    if "w6" in res:
        w = res["w6"]
        if w.get("ferry_s"):
            rs = (f", rsync over TCP {w['rsync_s']:.1f} s ({w['rsync_mib_s']:.2f} MiB/s), ferry / rsync throughput "
                  f"{w['ratio']:.2f}") if w.get("rsync_s") else ""
            print(f"W6 {w['mib']} MiB over {w['mode']} link, ping RTT {w['ping_rtt_ms']} ms, loss {w['loss_ppm']} ppm: "
                  f"ferry {w['ferry_s']:.1f} s ({w['ferry_mib_s']:.2f} MiB/s){rs}")


if __name__ == "__main__":
    main()
