"""Free TCP ports on the loopback interface."""

import socket

LOOPBACK = "127.0.0.1"

# Substrings that servers write to their logs when a listen call fails with
# EADDRINUSE: Go servers (etcd, kube-apiserver) write the errno text, Erlang
# listeners (RabbitMQ's AMQP and management ports) write the atom, and the
# Erlang distribution listener writes its own sentence.
ADDRESS_IN_USE_MARKERS = (
    "address already in use",
    "eaddrinuse",
    "could not bind to distribution port",
)


def reserve_free_ports(count: int) -> list[int]:
    """Return `count` distinct TCP ports on 127.0.0.1 that are free right now.

    All sockets stay bound until every port is chosen, so the ports differ
    from each other. Another process may still take one before the server
    binds it; servers report that in their logs (see `is_address_in_use`).
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def is_address_in_use(log_text: str) -> bool:
    """Return whether a server log reports a failed bind on a busy port."""
    lowered = log_text.lower()
    return any(marker in lowered for marker in ADDRESS_IN_USE_MARKERS)


def is_port_open(port: int, host: str = LOOPBACK, timeout_seconds: float = 0.5) -> bool:
    """Return whether a TCP connection to host:port succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout_seconds):
            return True
    except OSError:
        return False
