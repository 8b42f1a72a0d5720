"""What the realtime suites' process-transport modules share: their transport, and a check that it is in use.

A module imports these beside the tests it re-runs; its imported ``server`` fixture reads ``engine_transport``.
"""

from __future__ import annotations

import os

import pytest

from tests.engine.test_process_transport import engine_pid_of


@pytest.fixture(scope="module")
def engine_transport() -> str:
    return "process"


@pytest.mark.usefixtures("server")
def test_the_server_here_runs_its_engine_in_a_process():
    assert engine_pid_of(os.getpid())  # the module's live server runs in this process; its engine is our child
