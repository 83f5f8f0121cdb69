"""Servers for the API backend tests: a scripted in-process fake and real `mlx_lm server`s.

The fake speaks two dialects of `/v1/completions`: OpenAI legacy (int `logprobs`, echo,
`{token: lp}` top dicts, text offsets) and mlx-lm's (bool `logprobs` + `top_logprobs`, a
`content` list with ids, top entries in no order, no echo). Its "model" is a fixed random
log-softmax over a 40-word vocabulary per prompt; echoed token i has log-prob -(i+1)/10 - shift.
It can also misbehave on demand: serve raw bytes as a 200 answer (`raw_next`), or dribble its
answers one byte at a time (`stall`), as an overloaded server or a slow proxy does.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = [f" w{i}" for i in range(40)]
TOKEN = re.compile(r"\s*\S+|\s+")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fake_dist(prompt: str, shift: float) -> np.ndarray:
    """The fake model's next-token log-probs over VOCAB after `prompt`."""
    rng = np.random.default_rng(zlib.crc32(prompt.encode()) + int(round(shift * 1000)))
    logits = rng.normal(size=len(VOCAB)) * 2.0
    return logits - np.log(np.exp(logits).sum())


def echo_logprob(i: int, shift: float) -> float:
    return -(i + 1) / 10 - shift


@dataclass
class FakeServer:
    """A scripted completions endpoint on 127.0.0.1 in a thread."""

    dialect: str = "legacy"  # "legacy" | "mlx"
    cap: int = 20
    shift: float = 0.0
    key: str | None = None
    fail_next: int = 0
    fail_status: int = 503
    seen: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    raw_next: list[bytes] = field(default_factory=list)  # served verbatim, status 200, first
    stall: str = ""  # "headers": dribble the whole answer; "body": the head at once, then dribble
    stall_s: float = 0.1  # seconds between dribbled bytes
    stalled: list[str] = field(default_factory=list)  # one entry per dribbled answer
    hangups: list[str] = field(default_factory=list)  # dribbles ended by the client hanging up

    def __post_init__(self) -> None:
        fake = self
        self.stopping = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization")
                fake.seen.append(body)
                fake.auth_headers.append(auth)
                if fake.raw_next:
                    status, data = 200, fake.raw_next.pop(0)
                else:
                    status, answer = fake.answer(body, auth)
                    data = json.dumps(answer).encode()
                if fake.stall:
                    fake.dribble(self.wfile, status, data)
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        """Stop serving; a dribble in progress ends within `stall_s`."""
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def dribble(self, wfile: Any, status: int, data: bytes) -> None:
        """Write an answer one byte per `stall_s` until it is sent, the server stops, or the
        client hangs up (then recorded in `hangups`)."""
        head = (
            f"HTTP/1.0 {status} Dribbled\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        if self.stall == "body":
            wfile.write(head)
            rest = data
        else:
            rest = head + data
        self.stalled.append(self.stall)
        try:
            for i in range(len(rest)):
                if self.stopping.wait(self.stall_s):
                    return
                wfile.write(rest[i : i + 1])
        except OSError:  # broken pipe or reset: the client gave up
            self.hangups.append(self.stall)

    def answer(self, body: dict[str, Any], auth: str | None) -> tuple[int, dict[str, Any]]:
        if self.key is not None and auth != f"Bearer {self.key}":
            # Like some real servers, echo what was received (the backend must scrub it).
            return 401, {"error": {"message": f"Incorrect API key provided: {auth}"}}
        if self.fail_next > 0:
            self.fail_next -= 1
            return self.fail_status, {"error": "temporarily unavailable"}
        prompt = body["prompt"]
        n_gen = int(body.get("max_tokens", 16))
        if self.dialect == "mlx":
            return self._mlx(body, prompt, n_gen)
        return self._legacy(body, prompt, n_gen)

    def _legacy(self, body: dict[str, Any], prompt: str, n_gen: int) -> tuple[int, dict[str, Any]]:
        k = body.get("logprobs")
        if isinstance(k, bool):
            return 400, {"error": {"message": "logprobs must be an integer"}}
        if k is not None and k > self.cap:
            return 400, {"error": {"message": f"logprobs must be at most {self.cap}"}}
        dist = fake_dist(prompt, self.shift)
        gen = VOCAB[int(np.argmax(dist))]
        choice: dict[str, Any] = {"index": 0, "text": gen * n_gen, "finish_reason": "length"}
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if body.get("echo"):
            pieces = TOKEN.findall(prompt)
            tokens += pieces
            values += [None] + [echo_logprob(i, self.shift) for i in range(1, len(pieces))]
            tops += [None] * len(pieces)
            choice["text"] = prompt + choice["text"]
        order = np.argsort(-dist)[: k or 0]
        tokens.append(gen)
        values.append(float(dist.max()))
        tops.append({VOCAB[i]: float(dist[i]) for i in order})
        offsets = list(np.cumsum([0, *map(len, tokens[:-1])]).astype(int).tolist())
        if k is not None:
            choice["logprobs"] = {
                "tokens": tokens,
                "token_logprobs": values,
                "top_logprobs": tops,
                "text_offset": offsets,
            }
        n_prompt = len(TOKEN.findall(prompt))
        usage = {"prompt_tokens": n_prompt, "completion_tokens": 1}
        return 200, {"object": "text_completion", "choices": [choice], "usage": usage}

    def _mlx(self, body: dict[str, Any], prompt: str, n_gen: int) -> tuple[int, dict[str, Any]]:
        if not isinstance(body.get("logprobs", False), bool):
            return 400, {"error": "logprobs must be of type bool"}
        k = int(body.get("top_logprobs", -1))
        if k > self.cap:
            return 400, {"error": f"top_logprobs must be at most {self.cap}"}
        dist = fake_dist(prompt, self.shift)
        best = int(np.argmax(dist))
        choice: dict[str, Any] = {
            "index": 0,
            "text": VOCAB[best] * n_gen,
            "finish_reason": "length",
        }
        if k > 0:
            order = np.argsort(-dist)[:k][::-1]  # deliberately not sorted by probability
            top = [{"id": int(i), "token": VOCAB[i], "logprob": float(dist[i])} for i in order]
            choice["logprobs"] = {"content": [dict(top[0], top_logprobs=top)]}
        elif body.get("logprobs"):
            choice["logprobs"] = {"content": [{"id": best, "logprob": float(dist[best])}]}
        usage = {"prompt_tokens": len(TOKEN.findall(prompt)), "completion_tokens": 1}
        return 200, {"object": "text_completion", "choices": [choice], "usage": usage}


@dataclass
class RedirectServer:
    """Answers every POST with `status` and `Location: <target>` (a hop to another server)."""

    target: str
    status: int = 302
    auth_headers: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        hop = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers["Content-Length"]))
                hop.auth_headers.append(self.headers.get("Authorization"))
                self.send_response(hop.status)
                self.send_header("Location", hop.target)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class MlxServer:
    """A real `python -m mlx_lm server` subprocess on a free port (always stopped)."""

    model: Path
    adapter: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    log_path: Path | None = None

    def start(self, log_dir: Path) -> MlxServer:
        port = free_port()
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(self.model)]
        if self.adapter is not None:
            cmd += ["--adapter-path", str(self.adapter)]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        self.log_path = log_dir / f"mlx-server-{port}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        assert self.process is not None and self.log_path is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mlx_lm server exited ({self.process.returncode}): "
                    + self.log_path.read_text(errors="replace")[-2000:]
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"mlx_lm server at {self.url} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
