#!/usr/bin/env python3
# Time from connect to the big-inbox `summary` (issue 17): fills one user's inbox with
# SENDERS x PER messages (dev mode, limits off: source bench/no_limits.sh before starting the
# gateway), then connects ROUNDS times and reports, per round, connect -> `welcome` and
# connect -> `summary` (the upgrade request written -> the frame read), median and range.
# Nothing is acked, so every round sees the same inbox.
#   python3 bench/summary_latency.py HOST PORT [SENDERS PER ROUNDS]
import json, socket, statistics, struct, sys, time

HOST, PORT = sys.argv[1], int(sys.argv[2])
SENDERS, PER, ROUNDS = (int(a) for a in (sys.argv[3:6] + ['100', '100', '7'][len(sys.argv[3:6]):]))
assert HOST.startswith('127.') or HOST == '::1', 'loopback targets only'
RECIPIENT = f'sum{int(time.time())}'


def frame(text):
    p = text.encode()
    mask = b'\x11\x22\x33\x44'
    n = len(p)
    h = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0xfe]) + struct.pack('>H', n))
    return h + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(p))


def connect(user, query=''):
    s = socket.create_connection((HOST, PORT))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(f"GET /ws?user={user}{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
              "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
              "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    return s


class Reader:
    def __init__(self, s):
        self.s, self.buf, self.upgraded = s, b'', False

    def next(self):
        """The next text frame as JSON (the upgrade answer skipped)."""
        while True:
            if not self.upgraded and b'\r\n\r\n' in self.buf:
                assert self.buf.startswith(b'HTTP/1.1 101'), self.buf[:80]
                self.buf = self.buf[self.buf.find(b'\r\n\r\n') + 4:]
                self.upgraded = True
            if self.upgraded and len(self.buf) >= 2:
                n, off = self.buf[1] & 0x7f, 2
                if n == 126:
                    n, off = struct.unpack('>H', self.buf[2:4])[0], 4
                elif n == 127:
                    n, off = struct.unpack('>Q', self.buf[2:10])[0], 10
                if len(self.buf) >= off + n:
                    op, body = self.buf[0] & 0xf, self.buf[off:off + n]
                    self.buf = self.buf[off + n:]
                    if op == 1:
                        return json.loads(body)
                    continue
            d = self.s.recv(1 << 20)
            assert d, 'connection closed'
            self.buf += d


for k in range(SENDERS):
    s = connect(f'{RECIPIENT}s{k}')
    r = Reader(s)
    while r.next()['op'] != 'synced':
        pass
    s.sendall(b''.join(frame(json.dumps({"op": "send", "to": RECIPIENT, "cid": i, "body": {"n": i}}))
                       for i in range(PER)))
    got = 0
    while got < PER:
        v = r.next()
        assert v['op'] == 'accepted', v
        got += 1
    s.close()

welcome, summary = [], []
for _ in range(ROUNDS):
    t0 = time.perf_counter()
    s = connect(RECIPIENT, '&summary=1')
    r = Reader(s)
    v = r.next()
    assert v['op'] == 'welcome', v
    welcome.append(time.perf_counter() - t0)
    v = r.next()
    assert v['op'] == 'summary' and v['total'] == SENDERS * PER and len(v['senders']) == SENDERS, str(v)[:200]
    summary.append(time.perf_counter() - t0)
    s.close()
    time.sleep(0.3)  # the gateway lets the connection go (and, with Redis, the mirror)


def ms(xs):
    return f'median {statistics.median(xs) * 1000:.2f} ms [{min(xs) * 1000:.2f}-{max(xs) * 1000:.2f}]'


print(f'{SENDERS * PER} messages from {SENDERS} senders waiting, {ROUNDS} connects')
print(f'connect -> welcome  {ms(welcome)}')
print(f'connect -> summary  {ms(summary)}')
