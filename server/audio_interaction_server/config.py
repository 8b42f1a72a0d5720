"""Validated settings, built once at start-up and passed down (nothing reads the environment later)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


# Sampling ranges are what the sampler can run, checked where options enter (the wire, the config file),
# so one session's options can never reach the model worker as NaN probabilities or an unseedable generator.
# Below MIN_TEMPERATURE sampling is greedy in all but name (a logit gap of 1 becomes a factor of e^100) and,
# near 1e-38, logits / temperature overflows float32; 0 asks for greedy explicitly.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 5.0
# A nucleus below 0.1 % of the mass keeps only the most likely token for any model; far below it, top_p
# rounds to 0 in float32.
MIN_TOP_P = 1e-3
# Above any real vocabulary (Qwen's is 151,936), so every meaningful top_k fits; bounds JSON big integers.
MAX_TOP_K = 1_000_000
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer

ReplyMode = Literal["model", "on_request"]


class SamplingOptions(BaseModel):
    """Per-session reply sampling; the defaults are greedy, as the reference decodes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(
        0.0, ge=0.0, le=MAX_TEMPERATURE, description=f"0 = greedy, else {MIN_TEMPERATURE}..{MAX_TEMPERATURE}",
        # The same gap in the published JSON Schema, so schema validators refuse what the server refuses.
        json_schema_extra={"not": {"exclusiveMinimum": 0.0, "exclusiveMaximum": MIN_TEMPERATURE}},
    )
    top_p: float = Field(1.0, ge=MIN_TOP_P, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="0 = no top-k limit")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of this session's sampler; random when unset")

    @field_validator("temperature")
    @classmethod
    def _greedy_or_runnable(cls, temperature: float) -> float:
        if 0.0 < temperature < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE}; below that sampling is greedy "
                             "anyway and near 1e-38 it overflows")
        return temperature

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class ScriptedTurns(BaseModel):
    """Benchmarks only: the schedule scripted.scripted_token imposes on a random-weight model.

    Defined here, apart from the behaviour, so that the settings (and the wire schema, which uses
    them) load without the engine's state machine.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    every_chunks: int = Field(ge=2, description="a reply starts every this many chunks per session")
    reply_tokens: int = Field(ge=1, description="tokens per reply, TEXT_END excluded")


class EngineConfig(BaseModel):
    """What the worker needs: where the model is, where it runs, and its capacity."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: Path | None = Field(None, description="release checkpoint directory; None = tiny demo model")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU"
    )
    max_sessions: int = Field(16, ge=1, le=4096, description="KV-cache slots = concurrent sessions")
    max_positions: int = Field(
        4096, ge=128, le=32768, description="per-session context budget; the model was trained below 4096"
    )
    max_batch_rows: int | None = Field(None, ge=1, description="rows per step; None = max_sessions")
    cpu_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads (process-wide); None = torch's default. On a shared "
        "CPU host fewer threads than cores avoids oversubscription stalls"
    )
    attention: Literal["auto", "gather", "flex"] = Field(
        "auto",
        description="how attention reads the KV cache: flex = in place (compiled FlexAttention, for GPUs), "
        "gather = copy each row's slot (fast for small models on CPU); auto = flex on CUDA if its start-up "
        "self-check passes, else gather",
    )
    kv_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0,
        description="share of the accelerator memory free after loading that the KV cache may take; "
        "start-up fails with the largest max_sessions that fits when it does not",
    )
    encoder_batch_buckets: bool = Field(
        True,
        description="pad each audio-encoder call to one of a few batch sizes (1, 2, 3, 4, 6, 8, 12, ...) so "
        "the backend's per-shape kernel caches stop growing; the padding's outputs are dropped",
    )
    max_catch_up_speed: float | None = Field(
        4.0, gt=1.0,
        description="a session's audio backlog beyond catch_up_burst_s is heard at most this many times faster "
        "than real time, so a client sending audio far faster than real time cannot keep the worker busy for "
        "everybody else (docs/reliability.md, hostile clients); None = no pacing. Worker.run_until_idle "
        "(the offline runner) is never paced",
    )
    catch_up_burst_s: float = Field(
        10.0, ge=0.4, description="audio backlog a session may catch up on at full speed before pacing applies",
    )
    scripted_turns: ScriptedTurns | None = Field(
        None,
        description="benchmarks only: replace the model's decisions and reply tokens with a fixed schedule "
        "(a reply every N chunks, L tokens long) so random weights exercise the speaking path",
    )
    prompt_cache_size: int = Field(
        256, ge=0,
        description="encoded system prompts kept for reuse, least recently used dropped first; 4 bytes a "
        "token, and a prompt longer than max_positions (which cannot run) is not kept; 0 = encode at every open",
    )
    rollover_window_positions: int | None = Field(
        2048,
        ge=0,
        description="history re-fed when a session nears max_positions (context rollover); "
        "None = no rollover: the session ends with context_full at the budget",
    )


class SessionOptions(BaseModel):
    """Per-session model options (the wire protocol's session configuration carries these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system_prompt: str | None = Field(None, description="None = the model's trained system prompt")
    max_turn_tokens: int = Field(512, ge=1, le=4096, description="reply cap, emotion tag included")
    sampling: SamplingOptions = SamplingOptions()
    reply_mode: ReplyMode = Field(
        "model",
        description="model = the model decides at every chunk whether to reply (a reply can also be requested); "
        "on_request = the model only listens until a reply is requested (manual turns, as OpenAI Realtime's "
        "turn_detection null)",
    )
