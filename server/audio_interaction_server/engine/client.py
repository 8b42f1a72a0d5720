"""What the server's front asks of the engine, whatever carries it: one interface, two transports.

* ``engine.worker.Worker``: the engine on a thread of this process (tests, the CPU demo);
* ``engine.process_client.EngineProcessClient``: the engine in a process of its own, reached over ZeroMQ, so its
  host work (scheduling, packing rows, fanning events out) never waits for the sockets' GIL, nor they for it.

Both take the same calls and deliver the same events the same way: each session's ``emit`` is called with a
list of engine events on a thread of the transport (the worker thread, or the client's reader thread), and
must hop to its own loop. ``engine.transport`` in the config picks one (``choose_transport``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol

from audio_interaction_server.config import EngineConfig
from audio_interaction_server.engine.commands import EmitFn
from audio_interaction_server.options import SessionOptions

# An engine silent this long is not answering: its fronts refuse new sessions and say so in their log, until it is
# heard again or ``engine.hang_timeout_s`` passes (then it is lost: every session ends with worker_failed). Silence
# is the sign of a hang only: an engine process that ends is seen at once (its sentinel, or the supervisor's word).
# On the thread transport, a worker whose step loop has not turned this long is quiet in the same way.
ENGINE_QUIET_S = 2.0

if TYPE_CHECKING:
    import torch

    from audio_interaction_server.audio.blocks import PaddedBlocks
    from audio_interaction_server.engine.events import SessionStateSize, StepPath, StepStats
    from audio_interaction_server.model.checkpoint import LoadedModel

Transport = Literal["thread", "process"]


class CannotServe(RuntimeError):
    """Start-up found a reason the server cannot serve; its message says it whole (no exception name)."""


@dataclass(frozen=True)
class ModelSummary:
    """What the front needs to know of a model that lives in another process (a ``LoadedModel`` has the same
    fields, its device and dtype as torch's types: their ``str()`` is what the front shows)."""

    name: str
    device: str  # as the engine names it ("cuda:0"): str() of a LoadedModel's torch.device says the same
    dtype: str  # "bfloat16": str() of a LoadedModel's torch.dtype, without "torch."
    tokenizer: Any  # a tokenizers.Tokenizer, loaded by the front from the same checkpoint


def dtype_name(model: LoadedModel | ModelSummary) -> str:
    """The model's dtype as users read it ("bfloat16"), whichever side of the process boundary holds it."""
    return str(model.dtype).removeprefix("torch.")


class EngineClient(Protocol):
    """The engine as its callers see it. The session calls are thread-safe and never block on a step."""

    on_step: Callable[[StepStats], None] | None  # each step's figures (metrics); on a thread of the transport
    on_failure: Callable[[BaseException], None] | None  # once, when the engine died (every session was ended)

    @property
    def model(self) -> LoadedModel | ModelSummary | None: ...  # None until ``start`` has returned

    @property
    def step_path(self) -> StepPath | None: ...  # how the engine steps (graphs or not); None until it is known

    @property
    def engine_pid(self) -> int | None: ...  # the engine's own process, where it runs in one; None: this one

    # client_address: whose prefill budget the session's prompt is charged to (engine/prefill_budget.py)
    def open_session(self, session_id: str, options: SessionOptions, emit: EmitFn,
                     client_address: str | None = None) -> None: ...
    def push_audio(self, session_id: str, mel_chunks: torch.Tensor | PaddedBlocks) -> None: ...
    def cancel(self, session_id: str) -> None: ...
    def request_reply(self, session_id: str, max_turn_tokens: int | None = None) -> None: ...
    def clear_audio(self, session_id: str, keep_before: int = 0) -> None: ...
    def close_session(self, session_id: str) -> None: ...
    def check_options(self, options: SessionOptions) -> None: ...
    def checks_without_tokenising(self, system_prompt: str | None) -> bool: ...  # its encoding is kept
    def largest_turn_tokens(self, options: SessionOptions) -> int: ...  # what check_options allows
    def send_in_loop_turns(self) -> None: ...  # on the running loop that makes the session calls: batch its turns
    def state_size(self, session_id: str) -> SessionStateSize | None: ...

    @property
    def is_alive(self) -> bool: ...

    # How long an engine that is alive has not answered, once that is long enough to refuse new sessions for
    # (``ENGINE_QUIET_S``); None while it answers.
    @property
    def quiet_s(self) -> float | None: ...

    def start(self) -> None: ...
    def stop(self, timeout_s: float = 10.0) -> None: ...


def choose_transport(config: EngineConfig) -> Transport:
    """``engine.transport``; ``auto`` is a process where the engine runs on CUDA (the host path is the ceiling
    there) and a thread on the CPU (one process is simpler, and the CPU model is the bottleneck anyway)."""
    if config.transport != "auto":
        return config.transport
    if config.device == "auto":
        import torch

        return "process" if torch.cuda.is_available() else "thread"
    return "process" if config.device == "cuda" else "thread"
