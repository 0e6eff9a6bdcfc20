#!/usr/bin/env python3
"""Keeps N protocol-level clients joined to one shard of a `refleet up` fleet for a while.

    lobby_clients.py --status http://127.0.0.1:PORT/v1/status --session lobby --clients 9 --seconds 60

Looks the shard up in refleet up's /v1/status (its reflector's box URL and the Session's
appId), opens N WebSocket connections to it, JOINs each the way @multisynq/client does
(name `<appId>/<shard>`), sends a SEND now and then and a PULSE to stay active, and closes
them after --seconds. Python standard library only (a minimal RFC 6455 client), so the
Prometheus stage needs nothing from npm. Loopback targets only; bounded in time.
"""

import argparse
import base64
import json
import os
import socket
import struct
import sys
import time
import urllib.parse
import urllib.request


def frame(text):
    payload = text.encode()
    head = bytearray([0x81])
    n = len(payload)
    if n < 126:
        head.append(0x80 | n)
    elif n < 65536:
        head.append(0x80 | 126)
        head += struct.pack("!H", n)
    else:
        head.append(0x80 | 127)
        head += struct.pack("!Q", n)
    mask = os.urandom(4)
    head += mask
    return bytes(head) + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Client:
    def __init__(self, host, port, path):
        self.sock = socket.create_connection((host, port), timeout=5)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            response += chunk
        status = response.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"handshake refused: {status.decode(errors='replace')}")
        self.sock.setblocking(False)

    def send(self, obj):
        self.sock.setblocking(True)
        self.sock.sendall(frame(json.dumps(obj)))
        self.sock.setblocking(False)

    def drain(self):
        """Reads and drops whatever the reflector sent; False once the connection is closed."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return False
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self):
        try:
            self.sock.setblocking(True)
            close = bytearray([0x88, 0x82]) + os.urandom(4)
            code = struct.pack("!H", 1000)
            close += bytes(b ^ close[2 + i] for i, b in enumerate(code))
            self.sock.sendall(bytes(close))
        except OSError:
            pass
        self.sock.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--status", required=True, help="refleet up's /v1/status URL")
    ap.add_argument("--namespace", default="default")
    ap.add_argument("--session", default="lobby", help="Session object name")
    ap.add_argument("--shard", default=None, help="shard name (default: the session's shard 0)")
    ap.add_argument("--clients", type=int, default=9)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    if not 0 < args.clients <= 200 or not 0 < args.seconds <= 600:
        sys.exit("--clients in 1..200, --seconds in (0, 600]")

    deadline = time.time() + 30
    shard = None
    while time.time() < deadline:
        with urllib.request.urlopen(args.status, timeout=5) as r:
            status = json.load(r)
        for s in status.get("shards", []):
            if (s["namespace"], s["session"]) == (args.namespace, args.session) and s.get("url") and (
                s["name"] == args.shard or (args.shard is None and s["index"] == 0)
            ):
                shard = s
        if shard:
            break
        time.sleep(0.5)
    if not shard:
        sys.exit(f"no placed shard of {args.namespace}/{args.session} in {args.status}")
    url = urllib.parse.urlparse(shard["url"])
    if url.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing a non-loopback reflector {shard['url']}")
    session_id = f"promcheck-{shard['name'].replace('~', '-')}"
    clients = []
    for i in range(args.clients):
        c = Client(url.hostname, url.port, f"/reflector/{session_id}")
        c.send(
            {
                "id": session_id,
                "action": "JOIN",
                "args": {
                    "name": f"{shard['appId']}/{shard['name']}",
                    "apiKey": "none",
                    "appId": shard["appId"],
                    "persistentId": "promcheck",
                    "developerId": "promcheck",
                    "version": 1,
                    "user": f"view-{i}",
                    "ticks": {"tick": 1000, "delay": 0},
                    "leaveDelay": 0,
                },
            }
        )
        clients.append(c)
    print(f"{len(clients)} clients joined {shard['name']} at {shard['url']}", flush=True)
    end = time.time() + args.seconds
    n = 0
    while time.time() < end and clients:
        for c in list(clients):
            if not c.drain():
                clients.remove(c)
                continue
            c.send({"id": session_id, "action": "SEND", "args": [0, 0, f"m{n}", 0]})
            c.send({"id": session_id, "action": "PULSE"})
        n += 1
        time.sleep(1)
    for c in clients:
        c.close()
    print(f"lobby clients done ({len(clients)} still connected at the end)", flush=True)


if __name__ == "__main__":
    main()
