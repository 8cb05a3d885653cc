#!/usr/bin/python3
"""Connections per second against an NBD server, with raw sockets.

Each iteration: connect, read the newstyle greeting, send client flags,
NBD_OPT_GO for the export, read option replies up to NBD_REP_ACK, send
NBD_CMD_DISC, wait for the server to close, close. Repeated for SECONDS.

usage: connect.py (unix:PATH | tcp:HOST:PORT) EXPORT SECONDS
prints one JSON object: {"connections", "seconds", "errors", "rate", "first_error"}
"""
import json
import socket
import struct
import sys
import time

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
REP_ACK = 1
REQUEST_MAGIC = 0x25609513
CMD_DISC = 2


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return bytes(buf)


def one(target, name):
    if target[0] == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(target[1])
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.settimeout(10)
        s.connect((target[1], target[2]))
    try:
        greet = recv_exact(s, 18)
        if greet[:8] != NBDMAGIC or greet[8:16] != IHAVEOPT:
            raise ValueError("not a fixed-newstyle greeting: %r" % greet)
        (sflags,) = struct.unpack(">H", greet[16:18])
        cflags = FLAG_FIXED_NEWSTYLE | (sflags & FLAG_NO_ZEROES)
        payload = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        s.sendall(struct.pack(">I", cflags) + IHAVEOPT + struct.pack(">II", OPT_GO, len(payload)) + payload)
        while True:
            magic, opt, rtype, rlen = struct.unpack(">QIII", recv_exact(s, 20))
            if magic != REPLY_MAGIC:
                raise ValueError("bad option reply magic %x" % magic)
            if rlen:
                recv_exact(s, rlen)
            if rtype == REP_ACK:
                break
            if rtype & 0x80000000:
                raise ValueError("NBD_OPT_GO refused: reply type %x" % rtype)
        s.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 1, 0, 0))
        # wait for the server to close its end (it must, after NBD_CMD_DISC)
        while s.recv(4096):
            pass
    finally:
        s.close()


def main():
    spec, name, seconds = sys.argv[1], sys.argv[2].encode(), float(sys.argv[3])
    if spec.startswith("unix:"):
        target = ("unix", spec[5:])
    elif spec.startswith("tcp:"):
        host, port = spec[4:].rsplit(":", 1)
        target = ("tcp", host, int(port))
    else:
        raise SystemExit("target must be unix:PATH or tcp:HOST:PORT")
    n = errors = 0
    first_error = None
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        try:
            one(target, name)
            n += 1
        except Exception as e:  # count it and go on; too many errors stop the run
            errors += 1
            if first_error is None:
                first_error = "%s: %s" % (type(e).__name__, e)
            if errors > 50 and errors > n:
                break
    elapsed = time.monotonic() - start
    print(json.dumps({"connections": n, "seconds": elapsed, "errors": errors,
                      "rate": n / elapsed if elapsed > 0 else 0, "first_error": first_error}))


if __name__ == "__main__":
    main()
