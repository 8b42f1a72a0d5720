"""``client_key``: what one client's per-address limits count under."""

from __future__ import annotations

import pytest

from audio_interaction_server.api.addresses import client_key


@pytest.mark.parametrize("address, key", [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # same /64: same client
    ("2001:DB8:1:2:0:0:0:9", "2001:db8:1:2::/64"),  # spelled another way
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64: another client
    ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client on a dual-stack socket
    ("::1", "::1"),  # loopback is one machine
    ("fe80::1%eth0", "fe80::/64"),  # a zone is no part of the client
    ("unknown", "unknown"), ("", ""), ("not-an-ip", "not-an-ip"),  # not an address: as given
])
def test_an_ipv6_client_is_its_64_network_and_an_ipv4_one_its_address(address, key):
    """Every per-address limit keyed on the whole IPv6 address: an ISP gives each customer at least a /64, so one
    client could take a fresh address per connection and never meet any limit."""
    assert client_key(address) == key
