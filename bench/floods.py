#!/usr/bin/env python3
# The floods of issue 16 against a gateway with its default limits (dev mode, loopback only):
#   python3 bench/floods.py HOST PORT sends|pings1|pings3s|upgrades [SOURCE_ADDRESS]
# Prints what the flooding client got (pongs, accepted, rate_limited, the close code, or the
# upgrade statuses). README "Limits" quotes its output.
# Reproduce the floods against a gateway with default limits (dev mode).
import socket, struct, sys, time, os, json
HOST, PORT = sys.argv[1], int(sys.argv[2])
assert HOST.startswith('127.') or HOST == '::1', 'loopback targets only'
def frame(text, op=1):
    p = text.encode() if isinstance(text, str) else text
    mask = b'\x11\x22\x33\x44'
    h = bytes([0x80 | op])
    n = len(p)
    h += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack('>H', n)
    return h + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(p))
def upgrade(user, src='127.0.0.1'):
    s = socket.socket(); s.bind((src, 0)); s.connect((HOST, PORT))
    s.sendall(f"GET /ws?user={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode())
    buf = b''
    while b'\r\n\r\n' not in buf:
        d = s.recv(65536)
        if not d: break
        buf += d
    status = int(buf[9:12]) if len(buf) >= 12 else 0
    return s, status, buf[buf.find(b'\r\n\r\n') + 4:]
def read_all(s, buf, secs=5):
    s.settimeout(secs); out = []
    while True:
        while len(buf) >= 2:
            n = buf[1] & 0x7f; off = 2
            if n == 126: n = struct.unpack('>H', buf[2:4])[0]; off = 4
            elif n == 127: n = struct.unpack('>Q', buf[2:10])[0]; off = 10
            if len(buf) < off + n: break
            out.append((buf[0] & 0xf, buf[off:off + n])); buf = buf[off + n:]
            if out[-1][0] == 8: return out
        try:
            d = s.recv(1 << 20)
        except socket.timeout:
            return out
        if not d: return out
        buf += d
def summary(frames):
    pong = sum(1 for op, p in frames if op == 1 and b'"pong"' in p)
    acc = sum(1 for op, p in frames if op == 1 and b'"accepted"' in p)
    rl = sum(1 for op, p in frames if op == 1 and b'rate_limited' in p)
    close = [struct.unpack('>H', p[:2])[0] for op, p in frames if op == 8]
    return dict(pongs=pong, accepted=acc, rate_limited=rl, close=close)
which = sys.argv[3]
if which == 'sends':
    s, st, rest = upgrade('floodsend')
    s.sendall(b''.join(frame(json.dumps({"op":"send","to":"nobody","cid":f"x{i}","body":i})) for i in range(8000)))
    print('8000 sends in one write:', summary(read_all(s, rest)))
elif which == 'pings1':
    s, st, rest = upgrade('floodping')
    s.sendall(frame('{"op":"ping"}') * 50000)
    print('50000 app pings in one write:', summary(read_all(s, rest)))
elif which == 'pings3s':
    s, st, rest = upgrade('floodping3')
    batch = frame('{"op":"ping"}') * 1000
    t = time.time(); sent = 0
    s.setblocking(True)
    import threading
    res = {}
    def rd(): res['f'] = read_all(s, rest, secs=6)
    th = threading.Thread(target=rd); th.start()
    try:
        while time.time() - t < 3:
            s.sendall(batch); sent += 1000
    except OSError as e:
        pass
    th.join()
    print(f'pings for up to 3 s: wrote {sent} in {time.time()-t:.2f} s:', summary(res['f']))
elif which == 'upgrades':
    src = sys.argv[4] if len(sys.argv) > 4 else '127.0.0.9'
    counts = {}; t = time.time(); socks = []
    for i in range(600):
        s, st, _ = upgrade(f'up{i}', src)
        counts[st] = counts.get(st, 0) + 1
        if st == 101: socks.append(s)
        else: s.close()
    el = time.time() - t
    print(f'600 upgrades from {src} in {el:.2f} s ({600/el:.0f}/s):', counts)
