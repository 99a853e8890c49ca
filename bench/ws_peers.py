"""
The two ends of bench/ws.py: a WebSocket echo server, and a load client.

Both speak WebSocket (RFC 6455) on plain asyncio protocols, with no
library in the way, so that they cost little beside the balancer they
measure: the client sends small masked frames whose echo it knows the size
of, and the server unmasks and echoes them.  (bench/ws.py checks every
target with the C{websockets} library first, so that the protocol spoken
here is known to be the real one.)

    python bench/ws_peers.py serve PORT
    python bench/ws_peers.py handshakes PORT --concurrency 16 --seconds 8 ...
    python bench/ws_peers.py messages PORT --connections 64 --seconds 8 ...

The server answers plain HTTP requests (a health check) with 200.  A load
run prints one JSON line: how many exchanges were done in the measured
time, errors, and a histogram of their latencies (see L{Histogram}).
"""

import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


# ----------------------------------------------------------------- server --


def unmask(payload: bytes, key: bytes) -> bytes:
    if key == b"\0\0\0\0":
        return payload
    n = len(payload)
    keys = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(n, "big")


def frame(first: int, payload: bytes) -> bytes:
    """
    A server's frame (unmasked): C{first} is the FIN bit and opcode byte.
    """
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


class EchoServer(asyncio.Protocol):
    """
    One connection: plain HTTP requests get 200; an upgrade to WebSocket
    gets its 101, and from then on every data frame comes back, a ping gets
    its pong and a close its close.
    """

    def __init__(self):
        self.buffer = b""
        self.upgraded = False

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        buffer = self.buffer + data if self.buffer else data
        if not self.upgraded:
            buffer = self.http(buffer)
        if self.upgraded and buffer:
            buffer = self.frames(buffer)
        self.buffer = buffer

    def http(self, buffer):
        while not self.upgraded:
            head, sep, rest = buffer.partition(b"\r\n\r\n")
            if not sep:
                return buffer
            key = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            if key is None:
                self.transport.write(OK)
            else:
                accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                )
                self.upgraded = True
            buffer = rest
        return buffer

    def frames(self, buffer):
        out = []
        i, end = 0, len(buffer)
        while end - i >= 2:
            first, second = buffer[i], buffer[i + 1]
            n = second & 0x7F
            at = i + 2
            if n == 126:
                if end - at < 2:
                    break
                n = int.from_bytes(buffer[at:at + 2], "big")
                at += 2
            elif n == 127:
                if end - at < 8:
                    break
                n = int.from_bytes(buffer[at:at + 8], "big")
                at += 8
            if second & 0x80:
                if end - at < 4 + n:
                    break
                payload = unmask(buffer[at + 4:at + 4 + n], buffer[at:at + 4])
                at += 4 + n
            else:
                if end - at < n:
                    break
                payload = buffer[at:at + n]
                at += n
            i = at
            opcode = first & 0x0F
            if opcode == 0x8:
                out.append(frame(0x88, payload[:2]))
                self.transport.write(b"".join(out))
                self.transport.close()
                return b""
            if opcode == 0x9:
                out.append(frame(0x8A, payload))
            elif opcode != 0xA:
                out.append(frame(first, payload))
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        return buffer[i:]


async def serve(port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoServer, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


# ----------------------------------------------------------------- client --


class Histogram:
    """
    Latencies in buckets 2% wide (from 1 microsecond), so that processes'
    histograms add up and percentiles read within 2%.
    """

    SCALE = 1 / math.log(1.02)

    def __init__(self, counts=None):
        self.counts = counts if counts is not None else {}

    def add(self, seconds):
        micros = seconds * 1e6
        bucket = int(math.log(micros) * self.SCALE) if micros > 1 else 0
        self.counts[bucket] = self.counts.get(bucket, 0) + 1

    def merge(self, other):
        for bucket, n in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n

    def percentile(self, p):
        """
        The latency at percentile C{p}, in milliseconds.
        """
        total = sum(self.counts.values())
        if not total:
            return float("nan")
        rank = total * p / 100
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return math.exp((bucket + 0.5) / self.SCALE) / 1000
        return float("nan")


def request(port):
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (port, key)
    )


def afterSwitch(buffer, transport):
    """
    What C{buffer} holds after a whole C{101} head: None while the head is
    not whole, or when the answer is not a 101 (the connection is then
    aborted).
    """
    head, sep, rest = buffer.partition(b"\r\n\r\n")
    if not sep:
        return None
    if not head.startswith(b"HTTP/1.1 101"):
        transport.abort()
        return None
    return rest


def masked(first, payload):
    """
    A client's frame, masked with a zero key (valid, and nothing to XOR).
    """
    return bytes((first, 0x80 | len(payload))) + b"\0\0\0\0" + payload


class Run:
    """
    What a load run counts: exchanges done while measuring, their
    latencies, errors.
    """

    def __init__(self, loop, warmup, seconds, limit):
        now = loop.time()
        self.loop = loop
        self.start = now + warmup
        self.end = self.start + seconds
        self.limit = limit
        self.count = 0
        # Exchanges done, measured or not (what the fronts' CPU time is
        # divided by).
        self.all = 0
        self.errors = 0
        self.histogram = Histogram()
        self.finished = loop.create_future()
        self.measuredEnd = None

    def done(self, began):
        self.all += 1
        now = self.loop.time()
        if now >= self.start:
            if now >= self.end or self.count >= self.limit:
                self.stop(now)
                return False
            self.count += 1
            self.histogram.add(now - began)
        return True

    def stop(self, now=None):
        if self.measuredEnd is None:
            self.measuredEnd = now if now is not None else self.loop.time()
        if not self.finished.done():
            self.finished.set_result(None)

    @property
    def over(self):
        return self.finished.done()

    def report(self):
        elapsed = max((self.measuredEnd or self.loop.time()) - self.start, 1e-9)
        return {"count": self.count, "all": self.all, "seconds": elapsed, "errors": self.errors,
                "histogram": self.histogram.counts}


class Handshaker(asyncio.Protocol):
    """
    One handshake exchange: connect, upgrade, one message echoed, close
    (both ways), then the next on a new connection.
    """

    MESSAGE = masked(0x81, b"x" * 32)
    ECHO = frame(0x81, b"x" * 32)
    CLOSE = masked(0x88, b"\x03\xe8")
    CLOSED = frame(0x88, b"\x03\xe8")

    def __init__(self, run, port, again):
        self.run = run
        self.port = port
        self.again = again
        self.began = run.loop.time()
        self.buffer = b""
        self.stage = 0
        self.ok = False

    def connection_made(self, transport):
        self.transport = transport
        transport.write(request(self.port))

    def data_received(self, data):
        self.buffer += data
        if self.stage == 0:
            rest = afterSwitch(self.buffer, self.transport)
            if rest is None:
                return
            self.buffer = rest
            self.stage = 1
            self.transport.write(self.MESSAGE)
        if self.stage == 1 and len(self.buffer) >= len(self.ECHO):
            if not self.buffer.startswith(self.ECHO):
                self.transport.abort()
                return
            self.buffer = self.buffer[len(self.ECHO):]
            self.stage = 2
            self.transport.write(self.CLOSE)
        if self.stage == 2 and self.buffer.startswith(self.CLOSED):
            self.ok = True
            self.transport.close()

    def connection_lost(self, exc):
        if self.ok:
            more = self.run.done(self.began)
        else:
            self.run.errors += 1
            more = not self.run.over
        if more:
            self.again()


async def handshakes(port, concurrency, warmup, seconds, limit):
    loop = asyncio.get_running_loop()
    run = Run(loop, warmup, seconds, limit)

    def start():
        if run.over:
            return
        task = loop.create_task(
            loop.create_connection(lambda: Handshaker(run, port, start), "127.0.0.1", port)
        )
        task.add_done_callback(failed)

    def failed(task):
        if task.exception() is not None:
            run.errors += 1
            if run.errors > 1000:
                run.stop()
            else:
                loop.call_later(0.01, start)

    for _ in range(concurrency):
        start()
    await asyncio.wait_for(run.finished, warmup + seconds + 60)
    return run.report()


class PingPong(asyncio.Protocol):
    """
    One connection of a messages run: upgrade, then one message out and
    its echo back, again and again.
    """

    def __init__(self, run, port, size, ready):
        self.run = run
        self.port = port
        self.message = masked(0x82, b"m" * size)
        self.echo = len(frame(0x82, b"m" * size))
        self.ready = ready
        self.buffer = b""
        self.upgraded = False
        self.pending = 0

    def connection_made(self, transport):
        self.transport = transport
        transport.write(request(self.port))

    def go(self):
        self.began = self.run.loop.time()
        self.transport.write(self.message)

    def data_received(self, data):
        if not self.upgraded:
            self.buffer += data
            rest = afterSwitch(self.buffer, self.transport)
            if rest is None:
                return
            self.upgraded = True
            self.ready.set_result(self)
            data = rest
        self.pending += len(data)
        while self.pending >= self.echo:
            self.pending -= self.echo
            if self.run.done(self.began):
                self.go()
            else:
                return

    def connection_lost(self, exc):
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before the upgrade"))
        elif not self.run.over:
            self.run.errors += 1


async def messages(port, connections, size, warmup, seconds, limit):
    loop = asyncio.get_running_loop()
    # Opened first, then measured: this run is about messages, not handshakes.
    run = Run(loop, 3600, seconds, limit)
    peers = []
    for _ in range(connections):
        ready = loop.create_future()
        await loop.create_connection(lambda: PingPong(run, port, size, ready), "127.0.0.1", port)
        peers.append(await asyncio.wait_for(ready, 30))
    now = loop.time()
    run.start, run.end = now + warmup, now + warmup + seconds
    for peer in peers:
        peer.go()
    await asyncio.wait_for(run.finished, warmup + seconds + 60)
    for peer in peers:
        peer.transport.abort()
    return run.report()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    for name in ("handshakes", "messages"):
        c = sub.add_parser(name)
        c.add_argument("port", type=int)
        c.add_argument("--warmup", type=float, default=1.0)
        c.add_argument("--seconds", type=float, default=8.0)
        c.add_argument("--limit", type=int, default=10_000_000, help="stop after this many")
        if name == "handshakes":
            c.add_argument("--concurrency", type=int, default=16)
        else:
            c.add_argument("--connections", type=int, default=64)
            c.add_argument("--size", type=int, default=32, help="bytes per message (< 126)")
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.port))
        return 0
    if args.command == "handshakes":
        result = asyncio.run(
            handshakes(args.port, args.concurrency, args.warmup, args.seconds, args.limit)
        )
    else:
        if not 0 < args.size < 126:
            parser.error("--size: from 1 to 125 bytes")
        result = asyncio.run(
            messages(args.port, args.connections, args.size, args.warmup, args.seconds, args.limit)
        )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
