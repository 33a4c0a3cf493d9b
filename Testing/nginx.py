"""A real nginx (the Debian package) in front of the test's gateway replicas, run as a child
process (no daemon) with its pid, logs and temp files in a temporary directory.

Its configuration is the one docker-compose.yml ships, deploy/nginx/gateway.conf: only the
compose-specific lines change (Docker's DNS resolver and the `server gateway:8000 resolve`
line become one `server` line per replica on loopback, with the same parameters) and the
listen address becomes a free loopback port. Every proxy setting is the shipped one."""
from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from Testing.support import ROOT, free_port, http_json, wait_until

SHIPPED_CONF = ROOT / "deploy" / "nginx" / "gateway.conf"
_SERVER_LINE = re.compile(r"^(\s*)server\s+gateway:8000\s+resolve\s+([^;]*);", re.M)


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise AssertionError("nginx is not installed: scripts/test.sh installs it (apt-get install nginx)")
    return found


def render_conf(upstream_ports: list[int], listen_port: int) -> str:
    """The shipped server configuration, pointed at replicas on 127.0.0.1:<port>."""
    text = SHIPPED_CONF.read_text()
    match = _SERVER_LINE.search(text)
    assert match, "deploy/nginx/gateway.conf has no `server gateway:8000 resolve ...;` line"
    indent, params = match.group(1), match.group(2)
    servers = "\n".join(f"{indent}server 127.0.0.1:{port} {params};" for port in upstream_ports)
    text = text[:match.start()] + servers + text[match.end():]
    text = re.sub(r"^resolver .*;$", "", text, flags=re.M)
    text, listens = re.subn(r"^(\s*)listen 8000;", rf"\1listen 127.0.0.1:{listen_port};", text, flags=re.M)
    assert listens == 1, "deploy/nginx/gateway.conf should `listen 8000;` once"
    return text


class NginxProcess:
    def __init__(self, upstream_ports: list[int]) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="gw-nginx-"))
        self.dir.chmod(0o755)
        self.upstream_ports = upstream_ports
        self.proc: subprocess.Popen | None = None

    def write_config(self) -> Path:
        (self.dir / "gateway.conf").write_text(render_conf(self.upstream_ports, self.port))
        temp = self.dir / "tmp"
        temp.mkdir(exist_ok=True)
        temp.chmod(0o777)  # nginx's workers run as nobody when the master is root
        main = self.dir / "nginx.conf"
        main.write_text(f"""daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log info;
events {{ worker_connections 4096; }}
http {{
    # Which replica answered each request (a retried one lists every address tried, with a
    # status each: "a, b" and "502, 200"): the tests read it. `|` separates the three fields.
    log_format upstreams '$status|$upstream_addr|$upstream_status';
    access_log {self.dir}/access.log upstreams;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {self.dir}/gateway.conf;
}}
""")
        return main

    def check(self) -> subprocess.CompletedProcess:
        """`nginx -t` of the rendered configuration."""
        main = self.write_config()
        return subprocess.run([nginx_binary(), "-t", "-c", str(main), "-p", str(self.dir), "-e",
                               str(self.dir / "error.log")], capture_output=True, text=True, timeout=30)

    def start(self) -> "NginxProcess":
        main = self.write_config()
        self.proc = subprocess.Popen([nginx_binary(), "-c", str(main), "-p", str(self.dir), "-e",
                                      str(self.dir / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited with {self.proc.returncode}: {self.error_log()[-2000:]}")
            try:
                return http_json("GET", self.base_url + "/nginx-health", timeout=2)[0] == 200
            except OSError:
                return False

        wait_until(answers, timeout=15, message="nginx to answer")
        return self

    def access_log(self) -> list[tuple[int, list[str]]]:
        """(status, [replica addresses tried, in order]) of every request proxied so far.
        nginx separates the tries with ", " (and with " : " across upstream groups); "-" when
        no replica was tried."""
        path = self.dir / "access.log"
        entries = []
        for line in (path.read_text().splitlines() if path.exists() else []):
            status, upstreams, _ = line.split("|")
            addrs = [a.strip() for a in upstreams.replace(" : ", ", ").split(",") if a.strip() not in ("", "-")]
            entries.append((int(status), addrs))
        return entries

    def error_log(self) -> str:
        path = self.dir / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)   # graceful: finish what it proxies
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "NginxProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
