"""A TCP forwarder whose link can be cut, to break gRPC streams the way a network failure does."""

import socket
import threading


class Link:
    """Forwards 127.0.0.1:<port> to `target`. `cut()` drops every open connection at once;
    `cut_after(n)` drops them after n more client-to-server bytes. New connections keep working."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._budget: int | None = None
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, upstream_bound):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream_bound:
                    with self._lock:
                        if self._budget is not None:
                            self._budget -= len(data)
                            if self._budget <= 0:
                                self._budget = None
                                threading.Thread(target=self.cut, daemon=True).start()
                                return
                dst.sendall(data)
        except OSError:
            pass

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self._budget = nbytes

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
            self.cuts += 1
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.server.close()
        self.cut()
