"""The TCP forwarder that stands for a managed Redis endpoint (and for the link between a Redis
primary and its replica) in the failover scenarios."""

import socket
import struct
import threading
import time

from common import free_port, log


class Forwarder:
    """A TCP forwarder in the harness: what a managed Redis endpoint is to its clients.

    The daemons (and cqrsctl) are given its port, never a server's. Each connection is
    forwarded to the current target. `flip(port)` is the endpoint's failover — the DNS name of
    a Sentinel-managed, ElastiCache or other managed primary endpoint now resolving to the
    promoted replica: every open connection is reset (clients see a dropped connection, as
    after a real failover, and reconnect) and new ones reach the new primary. A target that
    refuses (a dead primary before the flip) gets the client's connection closed at once.

    The same forwarder also stands for the network between a primary and its replica: `hold`
    lets nothing more cross (a stalled link: the replica falls behind while the primary goes
    on), `cut` resets every connection (whatever was held back never arrives)."""

    def __init__(self, name, target_port):
        self.name, self.target, self.gen = name, target_port, 0
        self.lock = threading.Lock()
        self.pairs = set()
        self.holding = threading.Event()
        self.closed = False
        self.forwarded = 0  # bytes from the targets to the clients
        while True:
            self.port = free_port()
            self.lsock = socket.socket()
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.lsock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.lsock.close()
        self.lsock.listen(256)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                if self.closed:
                    return
                time.sleep(0.05)
                continue
            with self.lock:
                target, gen = self.target, self.gen
            try:
                u = socket.create_connection(("127.0.0.1", target), timeout=2)
                u.settimeout(None)
            except OSError:
                _reset(c)  # the target is down: so is the endpoint, for now
                continue
            for sk in (c, u):
                sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(self, c, u)
            with self.lock:
                current = gen == self.gen and not self.closed
                if current:
                    self.pairs.add(pair)
            if not current:  # flipped or cut while connecting: this one goes too
                pair.abort()
            pair.start()

    def _reset_all(self, target=None):
        with self.lock:
            if target is not None:
                self.target = target
            self.gen += 1
            pairs = list(self.pairs)
        for pair in pairs:
            pair.abort()
        return len(pairs)

    def flip(self, port):
        """The endpoint now leads to port; every open connection is reset."""
        n = self._reset_all(port)
        log("%s: flipped to 127.0.0.1:%d, %d connections reset" % (self.name, port, n))

    def hold(self):
        self.holding.set()

    def release(self):
        self.holding.clear()

    def cut(self):
        n = self._reset_all()
        log("%s: cut, %d connections reset" % (self.name, n))

    def close(self):
        self.closed = True
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        self.release()
        self._reset_all()


def _linger0(sk):
    """A close of sk now sends a TCP reset: nothing still buffered is delivered."""
    sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _reset(sk):
    """Close with a TCP reset: nothing still buffered is delivered."""
    try:
        _linger0(sk)
    except OSError:
        pass
    sk.close()


class _Pair:
    """A client connection and its upstream; one pump thread per direction. Sockets are only
    shut down from other threads (which wakes the pumps) and closed by the last pump."""

    def __init__(self, fwd, client, upstream):
        self.fwd, self.socks = fwd, (client, upstream)
        self.lock = threading.Lock()
        self.dead = False
        self.left = 2

    def start(self):
        c, u = self.socks
        for src, dst, down in ((c, u, False), (u, c, True)):
            threading.Thread(target=self._pump, args=(src, dst, down), daemon=True).start()

    def abort(self):
        with self.lock:
            if self.dead:
                return
            self.dead = True
            for sk in self.socks:
                try:
                    _linger0(sk)
                    sk.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _pump(self, src, dst, down):
        try:
            while not self.dead:
                data = src.recv(65536)
                if not data:
                    break
                while self.fwd.holding.is_set() and not self.dead:
                    time.sleep(0.005)  # held: this chunk waits; a cut drops it
                if self.dead:
                    break
                dst.sendall(data)
                if down:
                    self.fwd.forwarded += len(data)
        except OSError:
            pass
        self.abort()
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            for sk in self.socks:
                sk.close()
            with self.fwd.lock:
                self.fwd.pairs.discard(self)
