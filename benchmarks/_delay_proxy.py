"""A TCP proxy that delays every chunk by a fixed time each way: a network's round
trip on loopback, for benchmarks that count round trips (``tc netem`` is not
available on this machine). Threads and ``time.sleep``, because asyncio's timers
round up to the millisecond.

    python -m benchmarks._delay_proxy LISTEN_PORT TARGET_PORT ONE_WAY_MS
"""

from __future__ import annotations

import socket
import sys
import threading
import time


def _pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
    try:
        while chunk := source.recv(65536):
            due = time.perf_counter() + delay
            while (left := due - time.perf_counter()) > 0:
                time.sleep(left)
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(listen_port: int, target_port: int, one_way_ms: float) -> None:
    delay = one_way_ms / 1000
    server = socket.create_server(("127.0.0.1", listen_port))
    print("ready", flush=True)
    while True:
        client, _ = server.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))
        for end in (client, upstream):
            end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=_pump, args=(client, upstream, delay), daemon=True).start()
        threading.Thread(target=_pump, args=(upstream, client, delay), daemon=True).start()


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
