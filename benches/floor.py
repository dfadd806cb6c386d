#!/usr/bin/env python3
"""The kernel's own CPU cost per GiB of what a broker's produce and consume paths must do at
least, measured on this machine: receive over loopback TCP, write + fdatasync in 1 MiB steps,
read back from the page cache, send over loopback TCP. A broker's CPU-seconds per GB cannot
fall below the sum of its path's rows (docs/benchmarks.md, "The kernel's floor").

Usage: benches/floor.py [scratch-file]   (default: ./floor.bin, removed afterwards)
"""
import os
import resource
import socket
import sys

N = 1 << 30
CHUNK = 1 << 20


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def report(what, a, b):
    print(f"{what:<34} user {b[0] - a[0]:.2f}  system {b[1] - a[1]:.2f}  CPU-s/GiB")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "floor.bin"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    peer = os.fork()
    if peer == 0:  # the other end: sends 1 GiB, then receives 1 GiB
        c = socket.create_connection(srv.getsockname())
        buf = memoryview(bytearray(CHUNK))
        sent = 0
        while sent < N:
            sent += c.send(buf)
        got = 0
        while got < N:
            n = c.recv_into(buf)
            if n == 0:
                break
            got += n
        os._exit(0)
    conn, _ = srv.accept()
    buf = memoryview(bytearray(CHUNK))

    a, got = cpu(), 0
    while got < N:
        got += conn.recv_into(buf)
    report("receive over loopback TCP", a, cpu())

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    a = cpu()
    for _ in range(N // CHUNK):
        os.write(fd, buf)
        os.fdatasync(fd)
    report("write + fdatasync per MiB", a, cpu())
    os.close(fd)

    fd = os.open(path, os.O_RDONLY)
    a = cpu()
    for _ in range(N // CHUNK):
        os.readv(fd, [buf])
    report("read from the page cache", a, cpu())
    os.close(fd)
    os.unlink(path)

    a, sent = cpu(), 0
    while sent < N:
        sent += conn.send(buf)
    report("send over loopback TCP", a, cpu())
    os.waitpid(peer, 0)


if __name__ == "__main__":
    main()
