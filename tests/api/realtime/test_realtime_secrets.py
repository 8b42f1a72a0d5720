"""Ephemeral client secrets (api/realtime/secrets.py): valid until their expiry, under the key that signed them."""

from __future__ import annotations

import pytest

from audio_interaction_server.api.realtime.secrets import MAX_TTL_S, MIN_TTL_S, ClientSecrets

NOW_S = 1_800_000_000.0


def test_a_secret_is_valid_until_it_expires():
    secrets = ClientSecrets("api-key")
    minted = secrets.mint(60, now_s=NOW_S)
    assert minted.value.startswith("ek_") and minted.expires_at_s == NOW_S + 60
    assert secrets.is_valid(minted.value, NOW_S) and secrets.is_valid(minted.value, NOW_S + 59.9)
    assert not secrets.is_valid(minted.value, NOW_S + 60)


def test_an_expired_secret_is_told_from_a_wrong_one():
    secrets = ClientSecrets("api-key")
    minted = secrets.mint(60, now_s=NOW_S)
    assert secrets.expired_since(minted.value, NOW_S + 59) is None  # still valid
    assert secrets.expired_since(minted.value, NOW_S + 60) == 0
    assert secrets.expired_since(minted.value, NOW_S + 3660) == 3600
    assert ClientSecrets("rotated-key").expired_since(minted.value, NOW_S + 3660) is None  # not ours: just wrong
    assert all(secrets.expired_since(v, NOW_S) is None for v in ("", None, "api-key", "ek_x_y_z", minted.value + "0"))


def test_any_replica_with_the_same_key_accepts_it_and_another_key_does_not():
    minted = ClientSecrets("api-key").mint(60, now_s=NOW_S)
    assert ClientSecrets("api-key").is_valid(minted.value, NOW_S)  # another process, same key
    assert not ClientSecrets("rotated-key").is_valid(minted.value, NOW_S)
    assert not ClientSecrets().is_valid(minted.value, NOW_S)  # no key: a random one per process


def test_a_changed_secret_is_refused():
    secrets = ClientSecrets("api-key")
    value = secrets.mint(60, now_s=NOW_S).value
    expiry = value.split("_")[1]
    forged = [value.replace(expiry, str(int(expiry) + 3600), 1), value[:-1] + ("0" if value[-1] != "0" else "1"),
              value + "0", "ek_" + expiry, "", None, "api-key", "ek_x_y_z", "ek_" + "1" * 300]
    assert not any(secrets.is_valid(candidate, NOW_S) for candidate in forged)


def test_each_mint_is_a_new_secret():
    secrets = ClientSecrets("api-key")
    assert len({secrets.mint(60, now_s=NOW_S).value for _ in range(50)}) == 50


@pytest.mark.parametrize("ttl_s", [MIN_TTL_S - 1, MAX_TTL_S + 1, 0])
def test_lifetimes_outside_the_apis_bounds_are_refused(ttl_s):
    with pytest.raises(ValueError):
        ClientSecrets("api-key").mint(ttl_s)
