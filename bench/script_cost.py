#!/usr/bin/env python3
"""Where the spill's Redis time goes: ringgate's batch script against the contract's least.

1. Capture: a store bench run (`ringgate-bench store`, 1,000 users x 200 messages) on a
   redis-server watched by MONITOR; its spill calls (the EVALs of appends) are kept.
2. Per round, alternated, each on a fresh redis-server with AOF `appendfsync always`:
   * `ringgate`: the captured calls replayed with src/store/redis/script.lua;
   * `fence`: `ringgate-bench redis-floor --script --fence --batch 1024`, the contract's
     least work (same users, bodies and key shapes).
   Reported per message, from `INFO commandstats`: the script time, the commands it called,
   and the rest (the script's own Lua, and Redis's cost of each call from Lua).
3. Lua alone, no writes: the same calls with every command a Lua stub (one redis-server,
   passes interleaved, the least of 7), against a loop that only walks the operations (the
   cost of handing the arguments to Lua and the answers back).

Usage: python3 bench/script_cost.py [ROUNDS=3]   (BIN: dir with ringgate-bench, default
target/release; USERS and MESSAGES, default 1,000 and 200: smaller for the smoke test). Only
loopback redis-servers this script starts are load targets.
"""
import atexit
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN", os.path.join(ROOT, "target/release"))
BENCH = os.path.join(BIN, "ringgate-bench")
SCRIPT = open(os.path.join(ROOT, "src/store/redis/script.lua")).read()
USERS, MESSAGES = os.environ.get("USERS", "1000"), os.environ.get("MESSAGES", "200")

# Every command the script calls, answered as the replay's would be after a pair's first call:
# a pair born now (no new generation, no TTL refresh), no watermark, a top below every id (so
# the order check runs, as it does there), an inbox below its cap, no other node to push to.
STUB = """local realcall = redis.call
local stub_now = realcall('TIME')[1] .. '000'
local stub_pair = {stub_now, '0', stub_now, '999999999999', '0', '1'}
local function call(cmd)
  if cmd == 'XADD' then return '1-1' elseif cmd == 'HSETNX' then return 1
  elseif cmd == 'HMGET' then return stub_pair
  elseif cmd == 'XLEN' then return 1 elseif cmd == 'SMEMBERS' then return {}
  elseif cmd == 'TIME' then return realcall('TIME') else return 0 end
end
"""
GLOBALS = "local ARGV, tonumber, call, byte = ARGV, tonumber, redis.call, string.byte"
# Walks the appends (5 arguments each, after 10 fixed ones) and answers each with an id.
WALK = """local out = {}
local i = 11
while i <= #ARGV do
  out[#out + 1] = '1-1'
  i = i + 5
end
return out
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# Every child still running at exit (a failure included) is stopped: no redis-server, no MONITOR
# outlives the script.
CHILDREN = []


@atexit.register
def stop_children():
    for proc, path in CHILDREN:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if path:
            shutil.rmtree(path, ignore_errors=True)


class Redis:
    def __init__(self, *extra):
        self.port, self.dir = free_port(), tempfile.mkdtemp()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", ""] + list(extra)
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        CHILDREN.append((self.proc, self.dir))
        for _ in range(200):
            if self.cli("ping").strip() == "PONG":
                return
            time.sleep(0.05)
        sys.exit("FATAL: redis-server did not start")

    def cli(self, *a):
        return subprocess.run(["redis-cli", "-p", str(self.port)] + list(a),
                              capture_output=True, text=True).stdout

    def stats(self):
        out = {}
        for line in self.cli("info", "commandstats").splitlines():
            m = re.match(r"cmdstat_(\S+):calls=(\d+),usec=(\d+)", line)
            if m:
                out[m[1]] = int(m[3])
        return out

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def durable():
    return Redis("--appendonly", "yes", "--appendfsync", "always",
                 "--auto-aof-rewrite-percentage", "0")


def unescape(s):
    """MONITOR's quoted argument, back to its bytes."""
    out, i = bytearray(), 0
    simple = {"n": b"\n", "r": b"\r", "t": b"\t", "a": b"\a", "b": b"\b", '"': b'"', "\\": b"\\"}
    while i < len(s):
        if s[i] == "\\":
            if s[i + 1] == "x":
                out.append(int(s[i + 2:i + 4], 16))
                i += 4
            else:
                out += simple[s[i + 1]]
                i += 2
        else:
            out += s[i].encode("utf-8", "surrogateescape")
            i += 1
    return bytes(out)


def capture():
    """The spill's EVAL calls of one store bench run: [numkeys, keys..., args...] each."""
    r = Redis()
    # To a file: a pipe nobody reads while the bench runs would stall MONITOR.
    with tempfile.TemporaryFile() as log:
        mon = subprocess.Popen(["redis-cli", "-p", str(r.port), "monitor"], stdout=log)
        CHILDREN.append((mon, None))
        subprocess.run([BENCH, "store", "--redis-url", "redis://127.0.0.1:%d" % r.port,
                        "--users", USERS, "--messages", MESSAGES, "--json"],
                       check=True, stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        mon.terminate()
        mon.wait()
        log.seek(0)
        text = log.read().decode("utf-8", "surrogateescape")
    r.stop()
    token = re.compile(r'"((?:[^"\\]|\\.)*)"')
    calls = []
    for line in text.splitlines():
        head = line[:80]
        if '"EVAL"' not in head or "lua]" in head:
            continue
        args = [unescape(t) for t in token.findall(line)]
        nkeys = int(args[2])
        ops = args[3 + nkeys + 10:]
        if ops and ops[0] in (b"A", b"a"):
            if args[1] != SCRIPT.encode():
                sys.exit("FATAL: %s sent another script.lua than this checkout's (rebuild it)"
                         % BENCH)
            calls.append(args[2:])
    want = int(USERS) * int(MESSAGES)
    if appends(calls) != want:
        sys.exit("FATAL: captured %d appends of the spill's %d" % (appends(calls), want))
    return calls


def resp(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def send_all(conn, payload, replies):
    """Send a pipeline and read `replies` top-level answers (arrays, bulks, integers); an error
    reply, a closed connection or 120 s without a byte ends the script."""
    conn.settimeout(120)
    f = conn.makefile("rb", buffering=1 << 20)
    failures = []

    def read():
        try:
            pending = replies
            while pending > 0:
                line = f.readline()
                if not line.endswith(b"\r\n"):
                    raise EOFError("the connection closed mid-reply")
                pending -= 1
                kind = line[:1]
                if kind == b"*":
                    pending += max(0, int(line[1:-2]))
                elif kind == b"$" and int(line[1:-2]) >= 0:
                    f.read(int(line[1:-2]) + 2)
                elif kind == b"-":
                    raise ValueError(line[:200])
                elif kind not in (b":", b"$", b"+", b"_"):
                    raise ValueError("unexpected reply %r" % line[:80])
        except Exception as e:  # handed to the caller's thread: a reader's death is not a pass
            failures.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    conn.sendall(payload)
    reader.join()
    if failures:
        sys.exit("FATAL: %s" % failures[0])


def appends(calls):
    return sum(int(c[0]) // 2 for c in calls)


# Commands the measuring side sends itself (redis-floor's cleanup, readiness checks), not
# called from a script.
NOT_FROM_SCRIPTS = ("del", "ping", "info", "scan", "client|id", "config|resetstat")


def split(stats, messages):
    for name in NOT_FROM_SCRIPTS:
        stats.pop(name, None)
    script = stats.pop("eval", 0) / messages
    inner = sum(stats.values()) / messages
    return {"script_us": script, "commands_us": inner, "rest_us": script - inner}


def ringgate_side(calls):
    r = durable()
    conn = socket.create_connection(("127.0.0.1", r.port))
    payload = b"".join(resp([b"EVAL", SCRIPT.encode()] + c) for c in calls)
    started = time.time()
    send_all(conn, payload, len(calls))
    rate = appends(calls) / (time.time() - started)
    out = split(r.stats(), appends(calls))
    conn.close()
    r.stop()
    return dict(out, per_s=rate)


def fence_side():
    r = durable()
    line = subprocess.run([BENCH, "redis-floor", "--redis", "127.0.0.1:%d" % r.port, "--script",
                           "--fence", "--batch", "1024", "--users", USERS,
                           "--messages", MESSAGES, "--json"],
                          check=True, capture_output=True, text=True).stdout.splitlines()[-1]
    b = json.loads(line)
    out = split(r.stats(), b["messages"])
    r.stop()
    return dict(out, per_s=b["per_s"])


def lua_alone(calls):
    """Least of 7 interleaved passes, us per append, of the stubbed script and the walk."""
    stubbed = STUB + SCRIPT.replace(GLOBALS, "local ARGV, tonumber, byte = ARGV, tonumber, string.byte")
    if stubbed == STUB + SCRIPT:
        sys.exit("FATAL: script.lua's first line of globals changed; update GLOBALS here")
    r = Redis()
    conn = socket.create_connection(("127.0.0.1", r.port))
    sample = calls[:60]
    passes = {name: [] for name in ("stubbed", "walk")}
    for _ in range(7):
        for name, text in (("stubbed", stubbed), ("walk", WALK)):
            payload = b"".join(resp([b"EVAL", text.encode()] + c) for c in sample)
            before = r.stats().get("eval", 0)
            send_all(conn, payload, len(sample))
            passes[name].append((r.stats()["eval"] - before) / appends(sample))
    r.stop()
    return {name: min(v) for name, v in passes.items()}


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for tool in ("redis-server", "redis-cli"):
        if not shutil.which(tool):
            sys.exit("FATAL: %s needed (apt-get install redis-server redis-tools)" % tool)
    if not os.access(BENCH, os.X_OK):
        sys.exit("FATAL: %s missing (cargo build --release --workspace)" % BENCH)
    calls = capture()
    runs = {"ringgate": [], "fence": []}
    for n in range(rounds):
        order = ["ringgate", "fence"] if n % 2 == 0 else ["fence", "ringgate"]
        for side in order:
            run = ringgate_side(calls) if side == "ringgate" else fence_side()
            print(json.dumps(dict(run, side=side, round=n + 1)))
            runs[side].append(run)
    print("medians of %d alternated rounds, per message, AOF always:" % rounds)
    for side, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print("  %-8s script %5.2f us = commands %5.2f + the rest %5.2f; %7.0f msg/s" % (
            side, med["script_us"], med["commands_us"], med["rest_us"], med["per_s"]))
    lua = lua_alone(calls)
    figures = [r[k] for rs in runs.values() for r in rs for k in ("script_us", "commands_us", "per_s")]
    if min(figures + list(lua.values())) <= 0:
        sys.exit("FATAL: a figure came out zero or negative: nothing was measured")
    print("  ringgate's Lua alone (commands stubbed): %.2f us; handing arguments and answers "
          "(a loop over the operations): %.2f us; the script's own logic: %.2f us" % (
              lua["stubbed"], lua["walk"], lua["stubbed"] - lua["walk"]))


if __name__ == "__main__":
    main()
