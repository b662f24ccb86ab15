"""The ports the multi-process tests hand their rendezvous stores and slurmctld (tests/conftest.py)."""

from __future__ import annotations

import socket

from conftest import _bindable, _ephemeral_range_start, free_ports


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    """Below the range the kernel gives outgoing connections, so that no connection can take a port
    between its choice and the server binding it."""
    low = _ephemeral_range_start()
    ports = free_ports(5)
    assert len(set(ports)) == 5
    if low >= 12_000:
        assert all(low - 10_000 <= port < low for port in ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_not_taken_for_free():
    port = free_ports(1)[0]
    assert _bindable(port)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        assert not _bindable(port)
