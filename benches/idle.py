#!/usr/bin/env python3
"""Memory per idle keep-alive connection: cascade vs nginx, same object, same run.

Starts cascade (a directory origin, no cache) and nginx (serving the same directory
itself), then for each: opens N client connections on 127.0.0.1, sends one keep-alive GET
of a 4 KiB object on each, reads the answer, and leaves the connection open and idle.
Reports the proxy's RSS (all its processes) before and after, per connection. Bounded: N
connections, one request each, a 60 s deadline per proxy.

    benches/idle.py                       # N=10000, release build of cascade
    N=2000 CASCADE_BIN=... benches/idle.py
    CASCADE_EXTRA='  read_buffer: 64KiB' benches/idle.py   # lines added under `server:`

Needs nginx (scripts/deps.sh --bench) and a release build (cargo build --release).
"""
import os
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time

N = int(os.environ.get("N", "10000"))
TARGET = os.environ.get("CARGO_TARGET_DIR", "/var/tmp/cascade-target")
CASCADE_BIN = os.environ.get("CASCADE_BIN", f"{TARGET}/release/cascade")
NGINX = os.environ.get("NGINX", shutil.which("nginx") or "/usr/sbin/nginx")
EXTRA = os.environ.get("CASCADE_EXTRA", "")
DEADLINE_S = 60


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


def hold(port, n, path):
    """Opens n connections, one keep-alive GET each; returns the open sockets."""
    deadline = time.time() + DEADLINE_S
    req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    socks, sel = [], selectors.DefaultSelector()
    pending = {}
    for i in range(n):
        s = socket.socket()
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
            drive(sel, pending, req)
    while pending and time.time() < deadline:
        drive(sel, pending, req)
    if pending:
        raise SystemExit(f"{len(pending)} connections got no answer in {DEADLINE_S} s")
    return socks


def drive(sel, pending, req):
    for key, ev in sel.select(timeout=1):
        s, i = key.fileobj, key.data
        if ev & selectors.EVENT_WRITE:
            s.send(req)
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
            if length is not None and len(body) >= length:
                sel.unregister(s)
                del pending[i]
        elif _:
            raise SystemExit(f"unexpected answer: {head[:200]!r}")


def measure(name, pids_of, port, path):
    time.sleep(0.5)
    pids = pids_of()
    before = rss_kib(pids)
    socks = hold(port, N, path)
    time.sleep(1.0)
    after = rss_kib(pids_of())
    for s in socks:
        s.close()
    per = (after - before) / N
    print(f"| {name} | {N} | {before / 1024:.1f} | {after / 1024:.1f} | {(after - before) / 1024:.1f} | {per:.1f} |")
    return per


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = N + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    work = tempfile.mkdtemp(prefix="cascade-idle-")
    root = os.path.join(work, "www")
    os.makedirs(root)
    with open(os.path.join(root, "obj-4k.bin"), "wb") as f:
        f.write(os.urandom(4096))
    # nginx's workers (as nobody when started by root) read the same files.
    os.chmod(work, 0o755)
    os.chmod(root, 0o755)
    os.chmod(os.path.join(root, "obj-4k.bin"), 0o644)
    results = {}
    # cascade: a directory origin, no cache, one worker thread (nginx: one worker).
    port = free_port()
    metrics = free_port()
    cfg = os.path.join(work, "cascade.yaml")
    with open(cfg, "w") as f:
        f.write(
            f"server:\n  threads: 1\n  access_log: false\n{EXTRA}\n"
            f"listen: [{{addr: 127.0.0.1:{port}}}]\n"
            f"metrics: {{addr: 127.0.0.1:{metrics}}}\n"
            f"origins:\n  www: {{dir: {root}}}\n"
            "groups:\n  g: {main: www}\n"
            "routes:\n  - {path: /, group: g}\n"
        )
    with open(os.path.join(work, "cascade.log"), "w") as log:
        c = subprocess.Popen([CASCADE_BIN, "run", "-c", cfg], stdout=log, stderr=log)
    try:
        wait_port(port)
        print(f"Idle keep-alive connections, one 4 KiB GET each, then idle (N={N}):\n")
        print("| proxy | connections | RSS before MiB | RSS after MiB | delta MiB | KiB per connection |")
        print("|---|---|---|---|---|---|")
        results["cascade"] = measure("cascade", lambda: family(c.pid), port, "/obj-4k.bin")
    finally:
        c.terminate()
        c.wait(timeout=10)
    # nginx serving the same directory (its cheapest case: no upstream connection either).
    port = free_port()
    conf = os.path.join(work, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"worker_processes 1;\nerror_log {work}/nginx-error.log;\npid {work}/nginx.pid;\n"
            f"events {{ worker_connections {N + 256}; }}\n"
            f"worker_rlimit_nofile {N + 1024};\n"
            "http {\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  keepalive_requests 100000;\n"
            "  keepalive_timeout 300s;\n"
            f"  client_body_temp_path {work}/nb; proxy_temp_path {work}/np; fastcgi_temp_path {work}/nf;\n"
            f"  uwsgi_temp_path {work}/nu; scgi_temp_path {work}/ns;\n"
            f"  server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n"
        )
    n = subprocess.Popen([NGINX, "-c", conf, "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        results["nginx"] = measure("nginx", lambda: family(n.pid), port, "/obj-4k.bin")
    finally:
        n.terminate()
        n.wait(timeout=10)
    if results.get("nginx"):
        print(f"\ncascade/nginx memory per idle connection: {results['cascade'] / max(results['nginx'], 0.1):.1f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
