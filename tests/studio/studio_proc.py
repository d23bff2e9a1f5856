"""Start `llmrl studio` as a subprocess on a free port and talk to it over HTTP (tests only, 127.0.0.1)."""

from __future__ import annotations

import http.client
import queue
import re
import subprocess
import sys
import threading
import time
from urllib.parse import urlencode, urlparse


class Server:
    def __init__(self, *args: str, timeout: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "llmrl", "studio", *args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        self.output, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            m = re.search(r"open (http://\S+)", line)
            if m:
                self.url = m.group(1)
                u = urlparse(self.url)
                self.host, self.port, self.token = u.hostname, u.port, u.query.split("token=", 1)[1]
                return
        self.kill()
        raise RuntimeError("llmrl studio did not print its URL:\n" + "".join(self.output))

    def request(self, method: str, path: str, form: dict | None = None, params: dict | None = None):
        """(status, headers, body) of one request; GETs carry the token as a query parameter, POSTs in the form."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        query = "?" + urlencode({"token": self.token, **(params or {})}) if method == "GET" else ""
        body = urlencode({"token": self.token, **form}) if form is not None else None
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
        conn.request(method, path + query, body=body, headers=headers)
        resp = conn.getresponse()
        out = (resp.status, dict(resp.getheaders()), resp.read().decode("utf-8", "replace"))
        conn.close()
        return out

    def kill(self) -> None:
        """SIGKILL: no clean-up handler runs, as when the machine or the terminal dies."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
