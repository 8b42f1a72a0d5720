"""Validated settings, built once at start-up and passed down (nothing reads the environment later)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.scripted import ScriptedTurns


class SamplingOptions(BaseModel):
    """Per-session reply sampling; the defaults are greedy, as the reference decodes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k limit")
    seed: int | None = Field(None, description="seed of this session's sampler; random when unset")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


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
    scripted_turns: ScriptedTurns | None = Field(
        None,
        description="benchmarks only: replace the model's decisions and reply tokens with a fixed schedule "
        "(a reply every N chunks, L tokens long) so random weights exercise the speaking path",
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
