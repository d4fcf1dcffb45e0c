"""The benchmark's servers: nginx in the server namespace, a transparent haproxy in every gateway.

nginx answers every request itself (`return 200`, no file, no log), on port 80
(the "internet" host and the interception target) and 8080 (the load-balanced
backends, all of 10.90.0.0/16 being local to the server namespace). haproxy is
the transparent proxy that interception hands connections to: a `transparent`
bind on :15001 that answers itself, naming the destination it saw, so that a
measurement of interception measures the hand-over and not an upstream hop.
Both run in the foreground in their own process group, configured from files
in the run's temporary directory; one worker/thread each, so the load
generator has the other core.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import topology as topo

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; multi_accept on; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 60s;
  client_body_temp_path {dir}/nginx-body;
  proxy_temp_path {dir}/nginx-proxy;
  fastcgi_temp_path {dir}/nginx-fastcgi;
  default_type text/plain;
  server {{
    listen 80 backlog=4096;
    listen 8080 backlog=4096;
    location / {{ return 200 "nginx $server_addr:$server_port\\n"; }}
  }}
}}
"""

HAPROXY_CONF = """\
global
  maxconn 2000
  nbthread 1
  pidfile {dir}/haproxy-{variant}.pid
defaults
  mode http
  timeout connect 2s
  timeout client 5s
  timeout server 5s
  timeout http-request 5s
frontend intercepted
  bind 0.0.0.0:{port} transparent
  http-request return status 200 content-type text/plain lf-string "haproxy %[dst]:%[dst_port]\\n"
"""


@contextlib.contextmanager
def running(workdir: Path, variants: tuple[str, ...] = topo.VARIANTS) -> Iterator[dict[str, subprocess.Popen[Any]]]:
    """nginx in the server namespace and haproxy in each gateway, for the duration of the block."""
    procs: dict[str, subprocess.Popen[Any]] = {}
    try:
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=workdir))
        log = (workdir / "nginx.out").open("w")
        procs["nginx"] = topo.spawn_in(topo.SERVER_NS, ["nginx", "-e", str(workdir / "nginx-error.log"),
                                                        "-p", str(workdir), "-c", str(conf)], stderr=log)
        topo.wait_listening(topo.SERVER_NS, 8080, procs["nginx"], "nginx")
        for variant in variants:
            gw = topo.GATEWAYS[variant]
            cfg = workdir / f"haproxy-{variant}.cfg"
            cfg.write_text(HAPROXY_CONF.format(dir=workdir, variant=variant, port=topo.PROXY_PORT))
            hlog = (workdir / f"haproxy-{variant}.out").open("w")
            procs[f"haproxy-{variant}"] = topo.spawn_in(gw.ns, ["haproxy", "-db", "-f", str(cfg)], stderr=hlog,
                                                        stdout=hlog)
            topo.wait_listening(gw.ns, topo.PROXY_PORT, procs[f"haproxy-{variant}"], "haproxy")
        yield procs
    finally:
        for proc in procs.values():
            topo.stop(proc)


def http_get(ns: str, url: str, timeout: float = 3.0, cgroup: str | None = None) -> str:
    """One request with curl from `ns` (optionally from inside a cgroup v2 directory): the body, or an error text."""
    argv = ["ip", "netns", "exec", ns, "curl", "-s", "-S", "--max-time", str(timeout), url]
    if cgroup is not None:
        argv = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', cgroup, *argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10)
    return res.stdout.strip() if res.returncode == 0 else f"error: {res.stderr.strip()}"
