#!/usr/bin/env python3
"""Memory per client connection: cascade vs nginx, same object, same run.

Starts cascade (a directory origin) and nginx (serving the same directory itself), then for
each: opens N client connections on 127.0.0.1 and sends one keep-alive GET on each. Reports
the proxy's RSS (all its processes) before and after, per connection. Bounded: N
connections, one request each, a 60 s deadline per proxy.

SLOW selects what the clients do:
- unset (idle keep-alives): a 4 KiB object, the answer read whole, then the connection left
  open and idle. cascade has no cache.
- SLOW=hit (slow downloads of a cached object): a 1 MiB object that cascade's memory cache
  holds (filled by one request first); each client has a 4 KiB receive buffer, reads the
  header and the first 8 KiB of the body, then stops reading, so the proxy holds the rest of
  the download. nginx sends the file.
- SLOW=disk: the same slow downloads of an object that cascade's disk tier holds (a 1 MiB
  memory tier, which takes objects up to 256 KiB, over a disk tier in the work directory):
  the long tail of a catalog larger than memory.
- SLOW=pass: the same slow downloads with no cache, so cascade streams the object from an
  nginx origin over TCP while the client does not read.
- SLOW=evict: slow downloads of N different 8 MiB objects (EVICT_MIB) that the memory tier
  (64 MiB, memory only, `fill_memory: 16MiB`) churns through: in batches of 4, each object
  is fetched three times (TinyUFO admits it) and then 4 slow clients start on them, so every
  batch evicts objects that earlier slow responses are still sending. The tier is filled
  before the baseline is taken. What a hostile client gets by reading slowly from many
  connections, each on a different large object. (Objects larger than the kernel's socket
  buffer, 4 MiB here: a smaller one goes into it whole and the response is done.) nginx
  sends the same files.

    benches/idle.py                       # N=10000, release build of cascade
    N=2000 CASCADE_BIN=... benches/idle.py
    CASCADE_EXTRA='  read_buffer: 64KiB' benches/idle.py   # lines added under `server:`
    N=2000 SLOW=hit benches/idle.py
    N=2000 SLOW=pass HOLD=8 CASCADE_EXTRA='  send_timeout: 5s' benches/idle.py

TRICKLE=BYTES (with SLOW): instead of stopping, each client goes on reading BYTES every
100 ms (4096: ~40 KiB/s, a slow mobile client) for TRICKLE_S seconds (default 5), and the
RSS is taken then, while the downloads are still under way.

HOLD=S keeps the clients (still not reading) for S more seconds after the measurement, then
reports each proxy's RSS again and how many of the connections it has closed: with SLOW,
what a proxy's send timeout gives back (cascade's `server.send_timeout`; nginx's
`send_timeout`, 60 s by default, is left as it is).

Needs nginx (scripts/deps.sh --bench) and a release build (cargo build --release).
"""
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

N = int(os.environ.get("N", "10000"))
TARGET = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/cascade-target")
CASCADE_BIN = os.environ.get("CASCADE_BIN", f"{TARGET}/release/cascade")
# FLOOR=1 also measures the Pingora floor (benches/floor.rs, `cargo build --release --example
# floor`): a bare ProxyHttp on cascade's Pingora settings. Both then use an nginx origin.
FLOOR = os.environ.get("FLOOR", "0") == "1"
FLOOR_BIN = os.environ.get("FLOOR_BIN", f"{TARGET}/release/examples/floor")
NGINX = os.environ.get("NGINX", shutil.which("nginx") or "/usr/sbin/nginx")
EXTRA = os.environ.get("CASCADE_EXTRA", "")
SLOW = os.environ.get("SLOW", "")
if SLOW not in ("", "hit", "disk", "pass", "evict"):
    raise SystemExit(f"SLOW must be hit, disk, pass or evict (got {SLOW!r})")
OBJECT = "/obj-1m.bin" if SLOW else "/obj-4k.bin"
if SLOW == "evict":
    OBJECT = "/e/{i}.bin"  # one object per connection
# SLOW=evict: the objects' size; objects fetched (3 times each) to fill the memory tier
# before the baseline; slow clients started per batch.
EVICT_MIB = int(os.environ.get("EVICT_MIB", "8"))
EVICT_FILLER = 3 * 64 // EVICT_MIB
EVICT_BATCH = max(1, 32 // EVICT_MIB)
# Slow clients stop reading after this much body.
SLOW_READ = 8192
DEADLINE_S = 60
HOLD = float(os.environ.get("HOLD", "0"))
TRICKLE = int(os.environ.get("TRICKLE", "0"))
TRICKLE_S = float(os.environ.get("TRICKLE_S", "5"))
if TRICKLE and not SLOW:
    raise SystemExit("TRICKLE needs SLOW=hit, disk or pass")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def family(pid):
    """The process and its children (nginx workers)."""
    out = [pid]
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(p))
            except (FileNotFoundError, ValueError, IndexError):
                pass
    return out


def wait_port(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on {port}")


def fetch(port, paths, times=1):
    """GETs each path `times` times over one keep-alive connection, reading every answer."""
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    buf = b""
    for path in paths:
        for _ in range(times):
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            while b"\r\n\r\n" not in buf:
                buf += s.recv(1 << 16)
            head, _, buf = buf.partition(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n")[0]:
                raise SystemExit(f"{path}: {head[:200]!r}")
            length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n")
                          if l.lower().startswith(b"content-length:"))
            while len(buf) < length:
                buf += s.recv(1 << 16)
            buf = buf[length:]
    s.close()


def hold(port, n, path):
    """Opens n connections, one keep-alive GET each (of `path`, or of `path` with the
    connection's index for `{i}`); returns the open sockets. SLOW=evict: in batches, each
    batch's objects fetched three times first (see the module doc)."""
    if "{i}" in path and SLOW == "evict":
        socks = []
        for first in range(0, n, EVICT_BATCH):
            count = min(EVICT_BATCH, n - first)
            fetch(port, [path.format(i=first + j) for j in range(count)], times=3)
            socks += hold_some(port, count, path, first)
        return socks
    return hold_some(port, n, path, 0)


def hold_some(port, n, path, first):
    deadline = time.time() + DEADLINE_S
    socks, sel = [], selectors.DefaultSelector()
    pending = {}
    reqs = {}
    for i in range(n):
        reqs[i] = f"GET {path.format(i=first + i)} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        s = socket.socket()
        if SLOW:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
        sel.register(s, selectors.EVENT_WRITE, i)
        pending[i] = b""
        # Keep at most 256 handshakes/requests in flight.
        while len(pending) >= 256 and time.time() < deadline:
            drive(sel, pending, reqs)
    while pending and time.time() < deadline:
        drive(sel, pending, reqs)
    if pending:
        raise SystemExit(f"{len(pending)} connections got no answer in {DEADLINE_S} s")
    return socks


def drive(sel, pending, reqs):
    for key, ev in sel.select(timeout=1):
        s, i = key.fileobj, key.data
        if ev & selectors.EVENT_WRITE:
            s.send(reqs[i])
            sel.modify(s, selectors.EVENT_READ, i)
            continue
        data = s.recv(65536)
        if not data:
            raise SystemExit("a connection closed before its answer")
        pending[i] += data
        head, _, body = pending[i].partition(b"\r\n\r\n")
        if _ and b" 200 " in head.split(b"\r\n")[0]:
            length = next(
                (int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")),
                None,
            )
            if length is not None and len(body) >= (min(length, SLOW_READ) if SLOW else length):
                sel.unregister(s)
                del pending[i]
        elif _:
            raise SystemExit(f"unexpected answer: {head[:200]!r}")


def measure(name, pids_of, port, path):
    if SLOW == "evict":
        # The memory tier full before the baseline (nginx: the same requests).
        fetch(port, [f"/e/f{k}.bin" for k in range(EVICT_FILLER)], times=3)
    time.sleep(0.5)
    pids = pids_of()
    before = rss_kib(pids)
    socks = hold(port, N, path)
    if TRICKLE:
        trickle(socks)
    else:
        time.sleep(1.0)
    after = rss_kib(pids_of())
    held = None
    if HOLD > 0:
        time.sleep(HOLD)
        held = (rss_kib(pids_of()), closed_by_peer(socks))
    for s in socks:
        s.close()
    per = (after - before) / N
    print(f"| {name} | {N} | {before / 1024:.1f} | {after / 1024:.1f} | {(after - before) / 1024:.1f} | {per:.1f} |", flush=True)
    if name == "cascade" and SLOW == "evict" and METRICS_PORT:
        EVICT_METRICS.extend(scrape(METRICS_PORT, (
            'cascade_cache_bytes{tier="memory"}', 'cascade_cache_evictions_total{tier="memory"}',
            "cascade_cache_evicted_in_use_bytes", "cascade_cache_evicted_hits_total",
            "cascade_cache_fill_memory_bytes")))
    if held:
        HELD.append(f"{name}: {HOLD:g} s later, RSS {held[0] / 1024:.1f} MiB "
                    f"({(held[0] - before) / N:.1f} KiB per connection above the baseline); "
                    f"{held[1]} of {N} connections closed by the proxy")
    return per


HELD = []
EVICT_METRICS = []
METRICS_PORT = None


def scrape(port, names):
    """The named samples of cascade's metrics (those it has)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    text = b""
    while True:
        b = s.recv(1 << 16)
        if not b:
            break
        text += b
    s.close()
    lines = text.decode(errors="replace").splitlines()
    return [l for l in lines if any(l.startswith(n + " ") or l.startswith(n + "{") for n in names)]


def trickle(socks):
    """Each client reads up to TRICKLE bytes every 100 ms for TRICKLE_S seconds."""
    for sock in socks:
        sock.setblocking(False)
    deadline = time.time() + TRICKLE_S
    while time.time() < deadline:
        tick = time.time()
        for sock in socks:
            try:
                sock.recv(TRICKLE)
            except (BlockingIOError, OSError):
                pass
        time.sleep(max(0.0, 0.1 - (time.time() - tick)))


def closed_by_peer(socks, budget_s=3.0):
    """How many of `socks` the proxy has closed. What it sent is read and thrown away, in
    passes for up to `budget_s` (the bytes still in flight behind a close keep coming as the
    client's window opens): a connection is closed once its EOF or reset shows up."""
    open_ = list(socks)
    for sock in open_:
        sock.setblocking(False)
    closed = 0
    deadline = time.time() + budget_s
    while open_ and time.time() < deadline:
        still = []
        for sock in open_:
            try:
                while True:
                    if not sock.recv(1 << 16):
                        closed += 1
                        break
            except BlockingIOError:
                still.append(sock)
            except OSError:
                closed += 1
        open_ = still
        time.sleep(0.05)
    return closed


def measure_and_stop(name, proc, port):
    """`measure` the proxy `proc` listening on `port`, then stop it."""
    try:
        wait_port(port)
        return measure(name, lambda: family(proc.pid), port, OBJECT)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def start_nginx(work, name, root, port):
    """nginx serving `root` on `port` (one worker), as the reference proxy or as an origin."""
    conf = os.path.join(work, f"{name}.conf")
    with open(conf, "w") as f:
        f.write(
            f"worker_processes 1;\nerror_log {work}/{name}-error.log;\npid {work}/{name}.pid;\n"
            f"events {{ worker_connections {N + 256}; }}\n"
            f"worker_rlimit_nofile {N + 1024};\n"
            "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 100000;\n"
            "  keepalive_timeout 300s;\n  send_timeout 300s;\n"
            f"  client_body_temp_path {work}/{name}-b; proxy_temp_path {work}/{name}-p; fastcgi_temp_path {work}/{name}-f;\n"
            f"  uwsgi_temp_path {work}/{name}-u; scgi_temp_path {work}/{name}-s;\n"
            f"  server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n"
        )
    return subprocess.Popen([NGINX, "-c", conf, "-g", "daemon off;"], stderr=subprocess.DEVNULL)


def main():
    procs = []  # every server started, stopped on the way out whatever happens
    # SIGTERM/SIGHUP would end Python without running `finally`: make them exit through it.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, _f: sys.exit(128 + n))
    try:
        run(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=10)


def run(procs):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = N + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    work = tempfile.mkdtemp(prefix="cascade-idle-")
    root = os.path.join(work, "www")
    os.makedirs(root)
    with open(os.path.join(root, "obj-4k.bin"), "wb") as f:
        f.write(os.urandom(4096))
    with open(os.path.join(root, "obj-1m.bin"), "wb") as f:
        f.write(os.urandom(1 << 20))
    if SLOW == "evict":
        # Sparse files: N + EVICT_FILLER objects of EVICT_MIB without the disk space.
        os.makedirs(os.path.join(root, "e"))
        os.chmod(os.path.join(root, "e"), 0o755)
        for name in [f"{i}.bin" for i in range(N)] + [f"f{k}.bin" for k in range(EVICT_FILLER)]:
            path = os.path.join(root, "e", name)
            with open(path, "wb") as f:
                f.truncate(EVICT_MIB << 20)
            os.chmod(path, 0o644)
    # nginx's workers (as nobody when started by root) read the same files.
    os.chmod(work, 0o755)
    os.chmod(root, 0o755)
    os.chmod(os.path.join(root, "obj-4k.bin"), 0o644)
    os.chmod(os.path.join(root, "obj-1m.bin"), 0o644)
    results = {}
    # cascade: a directory origin, no cache, one worker thread (nginx: one worker).
    # Slow downloads through cascade come from an nginx origin over TCP (what a bucket is);
    # the idle case keeps the in-process directory origin (only 4 KiB crosses it).
    origin, origin_port = None, None
    if SLOW == "pass" or FLOOR:
        origin_port = free_port()
        origin = start_nginx(work, "origin", root, origin_port)
        procs.append(origin)
        wait_port(origin_port)
    port = free_port()
    metrics = free_port()
    global METRICS_PORT
    METRICS_PORT = metrics
    cfg = os.path.join(work, "cascade.yaml")
    with open(cfg, "w") as f:
        f.write(
            # The same idle timeout as the nginx below (a large N takes a while to open).
            f"server:\n  threads: 1\n  access_log: false\n  keepalive_timeout: 300s\n{EXTRA}\n"
            f"listen: [{{addr: 127.0.0.1:{port}}}]\n"
            f"metrics: {{addr: 127.0.0.1:{metrics}}}\n"
            + ("cache: {memory: 64MiB, default_ttl: 1h}\n" if SLOW == "hit" else "")
            + ("cache: {memory: 64MiB, fill_memory: 16MiB, default_ttl: 1h}\n" if SLOW == "evict" else "")
            + (f"cache: {{memory: 1MiB, disk: {{path: {work}/cache, size: 1GiB}}, default_ttl: 1h}}\n"
               if SLOW == "disk" else "")
            + (f"origins:\n  www: {{url: http://127.0.0.1:{origin_port}}}\n" if origin_port
               else f"origins:\n  www: {{dir: {root}}}\n")
            + "groups:\n  g: {main: www}\n"
            "routes:\n  - {path: /, group: g}\n"
        )
    with open(os.path.join(work, "cascade.log"), "w") as log:
        c = subprocess.Popen([CASCADE_BIN, "run", "-c", cfg], stdout=log, stderr=log)
    procs.append(c)
    try:
        try:
            wait_port(port)
        except SystemExit:
            with open(os.path.join(work, "cascade.log")) as f:
                sys.stderr.write(f.read()[-2000:])
            raise
        if SLOW in ("hit", "disk"):
            fill = socket.create_connection(("127.0.0.1", port))
            fill.sendall(f"GET {OBJECT} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            while fill.recv(1 << 16):
                pass
            fill.close()
            time.sleep(0.5)  # the cache entry is written after the answer
        what = {
            "": "Idle keep-alive connections, one 4 KiB GET each, then idle",
            "hit": "Slow downloads of a cached 1 MiB object (8 KiB read, then the client stops reading)",
            "disk": "Slow downloads of a 1 MiB object from the disk tier (8 KiB read, then the client stops reading)",
            "pass": "Slow downloads of a 1 MiB object, no cache (8 KiB read, then the client stops reading)",
            "evict": f"Slow downloads of N different {EVICT_MIB} MiB objects that the memory tier evicts under them (8 KiB read, then the client stops reading)",
        }[SLOW]
        print(f"{what} (N={N}):\n")
        print("| proxy | connections | RSS before MiB | RSS after MiB | delta MiB | KiB per connection |")
        print("|---|---|---|---|---|---|")
        results["cascade"] = measure("cascade", lambda: family(c.pid), port, OBJECT)
    finally:
        c.terminate()
        c.wait(timeout=10)
    if FLOOR:
        port = free_port()
        with open(os.path.join(work, "floor.log"), "w") as log:
            fl = subprocess.Popen(
                [FLOOR_BIN, str(port), "1", f"127.0.0.1:{origin_port}", f"127.0.0.1:{origin_port}"],
                stdout=log, stderr=log,
            )
        procs.append(fl)
        results["floor"] = measure_and_stop("floor", fl, port)
    if origin:
        origin.terminate()
        origin.wait(timeout=10)
    # nginx serving the same directory (its cheapest case: no upstream connection either).
    port = free_port()
    n = start_nginx(work, "nginx", root, port)
    procs.append(n)
    results["nginx"] = measure_and_stop("nginx", n, port)
    for line in HELD:
        print(line)
    if EVICT_METRICS:
        print("\ncascade after the slow downloads started:\n" + "\n".join(EVICT_METRICS))
    if results.get("nginx"):
        print(f"\ncascade/nginx memory per connection: {results['cascade'] / max(results['nginx'], 0.1):.1f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
