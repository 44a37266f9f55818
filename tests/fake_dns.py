"""A stand-in DNS server for the test "internet": every name under ``.test`` is ADDRESS.

Run inside the test's internet namespace: ``python3 fake_dns.py ADDRESS``.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading


def answer(query: bytes, address: str) -> bytes:
    (ident,) = struct.unpack("!H", query[:2])
    end = 12
    labels = []
    while query[end]:
        labels.append(query[end + 1 : end + 1 + query[end]].decode())
        end += 1 + query[end]
    question = query[12 : end + 5]
    qtype = struct.unpack("!H", query[end + 1 : end + 3])[0]
    known = ".".join(labels).endswith(".test")
    records = b""
    if known and qtype == 1:
        records = struct.pack("!HHHIH", 0xC00C, 1, 1, 60, 4) + socket.inet_aton(address)
    flags = 0x8180 if known else 0x8183  # NOERROR or NXDOMAIN
    header = struct.pack("!HHHHHH", ident, flags, 1, 1 if records else 0, 0, 0)
    return header + question + records


def serve_tcp(address: str) -> None:
    server = socket.create_server(("0.0.0.0", 53))
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                (length,) = struct.unpack("!H", conn.recv(2))
                reply = answer(conn.recv(length), address)
                conn.sendall(struct.pack("!H", len(reply)) + reply)
            except (OSError, IndexError, struct.error, UnicodeDecodeError):
                continue


def main() -> None:
    address = sys.argv[1]
    threading.Thread(target=serve_tcp, args=(address,), daemon=True).start()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 53))
    while True:
        query, peer = sock.recvfrom(4096)
        try:
            sock.sendto(answer(query, address), peer)
        except (IndexError, struct.error, UnicodeDecodeError):
            continue


if __name__ == "__main__":
    main()
