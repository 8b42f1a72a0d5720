"""The openai SDK on /v1/realtime with the server's engine in a process of its own (``engine.transport: process``).

test_realtime_clients.py's SDK cases run here unchanged: they are imported, so pytest runs them again with this
module's ``engine_transport``, which its ``server`` fixture reads (and, as there, no error may reach the server's
log). One engine process, shared by the module.
"""

from __future__ import annotations

from tests.api.realtime.test_realtime_clients import (  # noqa: F401  (imported tests run here over the process transport)
    client_logs, server,
    test_openai_sdk_manual_turns,
    test_openai_sdk_replies_manual_turn_cancel_and_refusal,
    test_openai_sdk_response_max_output_tokens_caps_that_response_only,
)
from tests.api.realtime.over_process import (  # noqa: F401  (this module's transport, and its check)
    engine_transport, test_the_server_here_runs_its_engine_in_a_process,
)
