"""/v1/realtime with the server's engine in a process of its own (``engine.transport: process``).

test_realtime_equality.py's cases run here unchanged: they are imported, so pytest runs them again with this
module's ``engine_transport``, which its ``server`` fixture reads. One engine process, shared by the module.
Realtime replies equal /v1/stream's here and on a thread (test_realtime_equality.py), and /v1/stream's tokens are
the same over both transports (tests/engine/test_process_transport.py): the same samples, the same replies.
"""

from __future__ import annotations

from tests.api.realtime.test_realtime_equality import (  # noqa: F401  (imported tests run here over the process transport)
    server, speech,
    test_manual_turns_reply_at_the_chunk_after_a_request_on_both_endpoints,
    test_the_same_samples_give_the_same_replies_on_both_endpoints,
)
from tests.api.realtime.over_process import (  # noqa: F401  (this module's transport, and its check)
    engine_transport, test_the_server_here_runs_its_engine_in_a_process,
)
