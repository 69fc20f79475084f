#!/usr/bin/env python3
"""delay-proxy.py: a TCP proxy that puts a long link between its clients and a server.

The benches need binhosts 30-150 ms away, and the reference kernel has no `netem`. This proxy
accepts connections on --listen, opens one to --upstream for each, and forwards both directions
with a one-way delay each (--rtt-ms N: N/2 each way). Every chunk is timestamped when it is
read and written out when its time comes (no per-byte sleeping), so the CPU cost is one timer
per chunk. Byte order is kept per direction; half-close (EOF one way) is forwarded, after the
delay, with write_eof(); a reset on either side closes both.

A long link is more than a delayed byte stream, so the proxy also models what TCP does on it
(--no-slow-start turns this off):
  - a new connection's first bytes from the client leave one RTT after it connected (the
    handshake: the client would have waited for the SYN-ACK), so a first request's answer
    comes 2 RTT after connect(), as on a real link;
  - each direction of each connection sends at most a congestion window per RTT: it starts at
    --initcwnd segments (Linux: 10 x 1448 bytes), grows by what was acknowledged (slow start,
    doubling every RTT) up to --max-window (a receive window; Linux's tcp_rmem max is 6 MiB),
    and falls back to the initial window after an idle spell longer than the RTO (Linux's
    tcp_slow_start_after_idle), so a kept-alive connection is not faster than it would be.
Time is virtual: a chunk "departs" at the time the window (and --rate, if set) allows, and
"arrives" a one-way delay later; the proxy sleeps only until arrival. With --rate the departures
of one direction, all connections together, are spaced as on a link of that rate (the benches
shape with tbf instead and leave --rate off).

  delay-proxy.py --listen 10.1.2.2:80 --upstream 127.0.0.1:8080 --rtt-ms 50
  delay-proxy.py --self-check --rtt-ms 50 --rate 100mbit   # measures itself, prints PASS/FAIL

python3 stdlib only.
"""

import argparse
import asyncio
import collections
import os
import re
import socket
import statistics
import subprocess
import sys
import time

MSS = 1448
CHUNK = 256 * 1024


def parse_rate(s):
    """tc-style rate ("100mbit", "1gbit", "500kbit", "12mbps") to bytes per second."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?)(bit|bps)?\s*", s.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad rate {s!r} (e.g. 100mbit, 1gbit)")
    n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return n / 8 if m.group(3) in (None, "bit") else n


def parse_size(s):
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?)i?b?\s*", s.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (e.g. 6M)")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2)])


def hostport(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"want HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


class Rate:
    """Departure spacing of one direction, shared by every connection (a link's rate)."""

    def __init__(self, bytes_per_s):
        self.bps = bytes_per_s
        self.next = 0.0

    def depart(self, t, n):
        if not self.bps:
            return t
        t = max(t, self.next)
        self.next = t + n / self.bps
        return t


class Window:
    """A sender's congestion window in virtual time (see the module doc)."""

    def __init__(self, rtt, initcwnd, max_window):
        self.rtt = rtt
        self.init = initcwnd
        self.max = max_window
        self.cwnd = initcwnd
        self.inflight = collections.deque()  # (ack time, bytes)
        self.bytes = 0
        self.last = None  # departure time of the last byte sent
        self.rto = max(0.2, rtt + 0.2)

    def _ack_until(self, t):
        while self.inflight and self.inflight[0][0] <= t:
            _, n = self.inflight.popleft()
            self.bytes -= n
            self.cwnd = min(self.max, self.cwnd + n)

    def piece(self, t, n):
        """(departure time, bytes) of the next piece of an n-byte chunk ready at t."""
        if self.last is not None:
            t = max(t, self.last)
            self._ack_until(t)
            if not self.inflight and t - self.last > self.rto:
                self.cwnd = min(self.cwnd, self.init)
        while self.cwnd - self.bytes <= 0:
            t = max(t, self.inflight[0][0])
            self._ack_until(t)
        return t, min(n, self.cwnd - self.bytes)

    def sent(self, t, n):
        """n bytes left at t (after the rate's spacing): acknowledged one RTT later."""
        self.inflight.append((t + self.rtt, n))
        self.bytes += n
        self.last = t


class Pump:
    """One direction of one connection: read, timestamp, release at arrival time, write."""

    def __init__(self, reader, writer, delay, rate, window, not_before, buffer):
        self.reader, self.writer = reader, writer
        self.delay, self.rate, self.window = delay, rate, window
        self.not_before = not_before  # first departure allowed (the handshake), virtual time
        self.buffer = buffer
        self.queue = collections.deque()  # (time read, bytes; None: EOF; OSError: reset)
        self.queued = 0
        self.have = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def read(self):
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self.reader.read(CHUNK)
            except OSError as e:  # a reset: passed on (after the bytes before it), ends both
                self.queue.append((loop.time(), e))
                self.have.set()
                return
            self.queue.append((loop.time(), data or None))
            self.have.set()
            if not data:
                return
            self.queued += len(data)
            if self.queued > self.buffer:
                self.room.clear()
                await self.room.wait()

    async def write(self):
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.have.clear()
                await self.have.wait()
            t, data = self.queue.popleft()
            if isinstance(data, OSError):
                raise data
            t = max(t, self.not_before)
            if data is None:
                if self.window and self.window.last is not None:
                    t = max(t, self.window.last)
                await self._sleep_until(loop, t + self.delay)
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            view = memoryview(data)
            while view:
                if self.window:
                    dep, k = self.window.piece(t, len(view))
                else:
                    dep, k = t, len(view)
                dep = self.rate.depart(dep, k)
                if self.window:
                    self.window.sent(dep, k)
                await self._sleep_until(loop, dep + self.delay)
                self.writer.write(view[:k])
                view = view[k:]
                t = dep
            await self.writer.drain()
            self.queued -= len(data)
            if self.queued <= self.buffer:
                self.room.set()

    @staticmethod
    async def _sleep_until(loop, when):
        # The event loop wakes up to a millisecond late (epoll's timeout is in whole ms,
        # rounded up): aim that much early.
        d = when - loop.time() - 0.001
        if d > 0:
            await asyncio.sleep(d)

    async def run(self):
        reading = asyncio.ensure_future(self.read())
        try:
            await self.write()
        finally:
            reading.cancel()


class Proxy:
    def __init__(self, args):
        self.args = args
        self.up_delay = args.up_delay_ms / 1000
        self.down_delay = args.down_delay_ms / 1000
        self.rtt = self.up_delay + self.down_delay
        self.rate_up = Rate(args.rate)
        self.rate_down = Rate(args.rate)
        self.conns = 0

    def window(self):
        if self.args.no_slow_start or self.rtt == 0:
            return None
        return Window(self.rtt, self.args.initcwnd * MSS, self.args.max_window)

    async def handle(self, c_reader, c_writer):
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.args.upstream)
        except OSError as e:
            print(f"delay-proxy: upstream {self.args.upstream}: {e}", file=sys.stderr)
            c_writer.close()
            return
        for w in (c_writer, u_writer):
            sock = w.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshake = 0 if self.args.no_slow_start else self.rtt
        up = Pump(c_reader, u_writer, self.up_delay, self.rate_up, self.window(),
                  accepted + handshake, self.args.buffer)
        down = Pump(u_reader, c_writer, self.down_delay, self.rate_down, self.window(),
                    0.0, self.args.buffer)
        self.conns += 1
        tasks = [asyncio.ensure_future(up.run()), asyncio.ensure_future(down.run())]
        try:
            # Both directions end with their EOF forwarded; an error on either ends both.
            for t in asyncio.as_completed(tasks):
                await t
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            for w in (c_writer, u_writer):
                w.close()
            self.conns -= 1

    async def serve(self):
        server = await asyncio.start_server(self.handle, *self.args.listen,
                                            reuse_address=True, backlog=512)
        if self.args.ready_file:
            with open(self.args.ready_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        async with server:
            await server.serve_forever()


# --- self-check ------------------------------------------------------------------------------

async def test_server(reader, writer):
    """Upstream for the self-check: 'echo\\n' echoes until EOF then closes; 'bulk N\\n' sends
    N bytes (a repeating counter pattern) and closes."""
    line = await reader.readline()
    if line.startswith(b"bulk "):
        n = int(line.split()[1])
        block = bytes(range(256)) * 1024
        while n > 0:
            writer.write(block[: min(n, len(block))])
            n -= len(block)
            await writer.drain()
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    writer.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def self_check(args):
    srv = await asyncio.start_server(test_server, "127.0.0.1", 0)
    uport = srv.sockets[0].getsockname()[1]
    pport = free_port()
    ready = f"/tmp/delay-proxy-check.{os.getpid()}"
    cmd = [sys.executable, os.path.abspath(__file__), "--listen", f"127.0.0.1:{pport}",
           "--upstream", f"127.0.0.1:{uport}", "--up-delay-ms", str(args.up_delay_ms),
           "--down-delay-ms", str(args.down_delay_ms), "--ready-file", ready]
    if args.rate:
        cmd += ["--rate", f"{args.rate * 8}bit"]
    if args.no_slow_start:
        cmd += ["--no-slow-start"]
    proc = subprocess.Popen(cmd)
    rtt = (args.up_delay_ms + args.down_delay_ms) / 1000
    ok = True

    def verdict(name, got, want, tol):
        nonlocal ok
        good = abs(got - want) <= tol
        ok &= good
        print(f"  {name:44s} {got * 1000:9.1f} ms  (expect {want * 1000:.0f} +- {tol * 1000:.0f}) "
              f"{'PASS' if good else 'FAIL'}")

    try:
        for _ in range(100):
            if os.path.exists(ready):
                break
            await asyncio.sleep(0.05)
        else:
            raise SystemExit("delay-proxy: self-check: the proxy did not start")
        print(f"delay-proxy self-check: RTT {rtt * 1000:.0f} ms "
              f"({args.up_delay_ms:g} up, {args.down_delay_ms:g} down), rate "
              f"{f'{args.rate * 8 / 1e6:g} Mbit/s' if args.rate else 'unlimited'}, "
              f"slow start {'off' if args.no_slow_start else 'on'}")
        # 1. connect + the first request's answer: 2 RTT with the handshake modelled.
        firsts, conns = [], []
        for _ in range(5):
            t0 = time.monotonic()
            r, w = await asyncio.open_connection("127.0.0.1", pport)
            conns.append(time.monotonic() - t0)
            w.write(b"echo\nx")
            await r.readexactly(1)
            firsts.append(time.monotonic() - t0)
        print(f"  {'connect() (local accept, median of 5)':44s} {statistics.median(conns) * 1000:9.1f} ms")
        verdict("connect + first answer (median of 5)", statistics.median(firsts),
                rtt if args.no_slow_start else 2 * rtt, 0.01 + 0.1 * rtt)
        # 2. ping on the open connection.
        pings = []
        for _ in range(10):
            t0 = time.monotonic()
            w.write(b"p")
            await r.readexactly(1)
            pings.append(time.monotonic() - t0)
        verdict("ping on an open connection (median of 10)", statistics.median(pings), rtt,
                0.003 + 0.05 * rtt)
        # 3. half-close: send 1 MiB, shut the write side, get it all back and then EOF.
        payload = os.urandom(1 << 20)
        w.write(payload)
        w.write_eof()
        back = await r.read(-1)
        good = back == payload
        ok &= good
        print(f"  {'half-close: 1 MiB echoed in order, then EOF':44s} {'PASS' if good else 'FAIL'}")
        w.close()
        # 4. many connections at once, each checks its bytes.
        async def one(i):
            rr, ww = await asyncio.open_connection("127.0.0.1", pport)
            data = os.urandom(64 * 1024 + i)
            ww.write(b"echo\n" + data)
            ww.write_eof()
            got = await rr.read(-1)
            ww.close()
            return got == data
        t0 = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(200)))
        good = all(results)
        ok &= good
        print(f"  {'200 concurrent connections, 64 KiB each way':44s} "
              f"{time.monotonic() - t0:9.2f} s   {sum(results)}/200 intact "
              f"{'PASS' if good else 'FAIL'}")
        # 5. throughput of one connection, and the proxy's CPU while it runs.
        n = args.check_mib << 20
        c0 = cpu_of(proc.pid)
        t0 = time.monotonic()
        rr, ww = await asyncio.open_connection("127.0.0.1", pport)
        ww.write(f"bulk {n}\n".encode())
        got = 0
        while True:
            d = await rr.read(1 << 20)
            if not d:
                break
            got += len(d)
        dt = time.monotonic() - t0
        ww.close()
        cpu = cpu_of(proc.pid) - c0
        mbit = got * 8 / dt / 1e6
        good = got == n
        if args.rate:
            good &= mbit <= args.rate * 8 / 1e6 * 1.05
        ok &= good
        print(f"  {f'one connection, {args.check_mib} MiB':44s} {dt:9.2f} s   {mbit:.0f} Mbit/s, "
              f"proxy CPU {cpu:.2f} s ({cpu / dt * 100:.0f}% of one core) "
              f"{'PASS' if good else 'FAIL'}")
    finally:
        proc.terminate()
        proc.wait()
        srv.close()
        try:
            os.unlink(ready)
        except FileNotFoundError:
            pass
    print(f"delay-proxy self-check: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", type=hostport, help="HOST:PORT to accept on")
    p.add_argument("--upstream", type=hostport, help="HOST:PORT to forward to")
    p.add_argument("--rtt-ms", type=float, help="round-trip time to add; half each way")
    p.add_argument("--up-delay-ms", type=float, default=0.0, help="client -> upstream delay")
    p.add_argument("--down-delay-ms", type=float, default=0.0, help="upstream -> client delay")
    p.add_argument("--rate", type=parse_rate, default=None,
                   help="cap each direction (all connections) at this rate, e.g. 100mbit")
    p.add_argument("--no-slow-start", action="store_true",
                   help="only delay bytes: no handshake RTT, no congestion window")
    p.add_argument("--initcwnd", type=int, default=10, help="initial window, segments [10]")
    p.add_argument("--max-window", type=parse_size, default=6 << 20,
                   help="largest window per direction of a connection [6M]")
    p.add_argument("--buffer", type=parse_size, default=16 << 20,
                   help="bytes held per direction of a connection before reading pauses [16M]")
    p.add_argument("--ready-file", help="write the pid here once listening")
    p.add_argument("--self-check", action="store_true",
                   help="measure RTT, order, half-close, concurrency and throughput; exit 0/1")
    p.add_argument("--check-mib", type=int, default=64, help="self-check transfer size [64]")
    args = p.parse_args()
    if args.rtt_ms is not None:
        args.up_delay_ms = args.down_delay_ms = args.rtt_ms / 2
    if args.self_check:
        sys.exit(asyncio.run(self_check(args)))
    if not args.listen or not args.upstream:
        p.error("--listen and --upstream are required (or --self-check)")
    try:
        asyncio.run(Proxy(args).serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
