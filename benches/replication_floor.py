#!/usr/bin/env python3
"""The kernel's own CPU cost of durable produce on one node against three replicating nodes on
this one machine: what issue #25's batched CPU ratio (cluster ÷ single node) cannot go below
whatever the broker does (docs/benchmarks.md, "The replication floor").

Each node is a process that does nothing but the kernel work its role must do per byte, in
100 KiB batches (the batched bench's Send size), syncing once per MiB written:
  - one node: receive over loopback TCP, write to its file, fdatasync;
  - three nodes: the leader receives, writes and syncs, and sends each batch to two followers
    over loopback TCP; each follower receives, writes and syncs.
The client (this process) is not counted, as the brokers' bench does not count its client.
Python, so the nodes' user time is small and their system time is all kernel.

Usage: benches/replication_floor.py [rounds, default 3] [scratch dir, default target/floor]
"""
import os
import shutil
import socket
import sys

BATCH = 100 << 10
N = 2560 * BATCH  # bytes produced per run (250 MiB, whole batches)
SYNC_EVERY = 1 << 20


def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def node(sock, path, followers):
    """Receives N bytes on `sock`'s one connection; writes, syncs, forwards them."""
    outs = [socket.create_connection(a) for a in followers]
    conn, _ = sock.accept()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    buf = bytearray(BATCH)
    view = memoryview(buf)
    got = unsynced = 0
    while got < N:
        filled = 0
        while filled < BATCH:
            n = conn.recv_into(view[filled:])
            if n == 0:
                os._exit(1)
            filled += n
        os.write(fd, view)
        for o in outs:
            o.sendall(view)
        got += BATCH
        unsynced += BATCH
        if unsynced >= SYNC_EVERY or got >= N:
            os.fdatasync(fd)
            unsynced = 0
    conn.sendall(b"k")  # done: everything written and synced here
    for o in outs:
        o.recv(1)  # and on each follower
    os._exit(0)


def spawn(path, followers):
    sock = listener()
    addr = sock.getsockname()
    pid = os.fork()
    if pid == 0:
        node(sock, path, followers)
    sock.close()
    return pid, addr


def run(dir, nodes):
    """CPU-seconds (user, system) the nodes spent on N bytes."""
    followers = [spawn(os.path.join(dir, f"follower{i}"), []) for i in range(nodes - 1)]
    leader = spawn(os.path.join(dir, "leader"), [a for _, a in followers])
    c = socket.create_connection(leader[1])
    batch = bytes(BATCH)
    for _ in range(N // BATCH):
        c.sendall(batch)
    c.recv(1)
    user = system = 0.0
    for pid, _ in [leader, *followers]:
        _, status, usage = os.wait4(pid, 0)
        if status != 0:
            sys.exit(f"a node failed ({status})")
        user += usage.ru_utime
        system += usage.ru_stime
    return user, system


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    dir = sys.argv[2] if len(sys.argv) > 2 else "target/floor"
    os.makedirs(dir, exist_ok=True)
    gib = N / (1 << 30)
    try:
        for r in range(rounds):
            one = run(dir, 1)
            three = run(dir, 3)
            print(
                f"round {r + 1}: one node user {one[0] / gib:.2f} system {one[1] / gib:.2f}"
                f" CPU-s/GiB; three nodes user {three[0] / gib:.2f} system"
                f" {three[1] / gib:.2f}; ratio {sum(three) / sum(one):.2f}"
            )
    finally:
        shutil.rmtree(dir, ignore_errors=True)


if __name__ == "__main__":
    main()
