"""Options one session chooses (sampling, reply cap, reply mode): one definition for the config file, the wire
and the engine. A leaf: it imports nothing of the package."""

from __future__ import annotations

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
