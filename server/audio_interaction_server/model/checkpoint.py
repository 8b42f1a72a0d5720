"""Builds the modules from a release checkpoint directory: the LM from its shards, the audio tower from its ``.pth``.

The directory's layout, and its check before anything is read, are in ``layout.py``. Every problem is raised as
one ``CheckpointError`` naming the file and what was expected, because a half-loaded model is worse than none.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from audio_interaction_server import yaml_errors
from audio_interaction_server.model.encoder import AudioTower, AudioTowerConfig
from audio_interaction_server.model.layout import (
    CheckpointError, CheckpointFiles, load_tokenizer, resolve_files,
)
from audio_interaction_server.model.lm import AudioInteractionLM, LMConfig
from audio_interaction_server.model.progress import LoadProgress

log = logging.getLogger(__name__)

# Every field LitGPT's Config (the version the release was saved with) accepts.
LITGPT_FIELDS = frozenset(
    """name hf_config block_size n_layer n_embd vocab_size padding_multiple padded_vocab_size
    norm_class_name norm_eps norm_qk post_attention_norm post_mlp_norm parallel_residual
    shared_attention_norm n_head head_size n_query_groups attn_bias attention_scores_scalar
    sliding_window_size sliding_window_layer_placing attention_logit_softcapping rope_base
    rotary_percentage rope_condense_ratio rope_adjustments intermediate_size bias mlp_class_name
    gelu_approximate n_expert n_expert_per_token scale_embeddings lm_head_bias
    final_logit_softcapping""".split()
)

# Fields whose non-default values would change the math we implement.
_UNSUPPORTED_IF_SET: dict[str, Any] = {
    "norm_qk": False,
    "post_attention_norm": False,
    "post_mlp_norm": False,
    "parallel_residual": False,
    "sliding_window_size": None,
    "attention_logit_softcapping": None,
    "final_logit_softcapping": None,
    "attention_scores_scalar": None,
    "rope_adjustments": None,
    "scale_embeddings": False,
    "n_expert": 0,
}


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def parse_lm_config(path: Path) -> LMConfig:
    """LitGPT ``Config(**yaml)`` semantics, including its derived fields."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path} is not valid YAML{yaml_errors.where(exc)}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a mapping of LitGPT Config fields")
    unknown = sorted(set(raw) - LITGPT_FIELDS)
    if unknown:
        raise CheckpointError(f"{path} has fields LitGPT's Config does not accept: {', '.join(unknown)}")
    for field in ("n_layer", "n_embd", "n_head", "vocab_size", "intermediate_size"):
        if not isinstance(raw.get(field), int) or raw[field] <= 0:
            raise CheckpointError(f"{path}: {field} must be a positive integer, got {raw.get(field)!r}")
    for field, neutral in _UNSUPPORTED_IF_SET.items():
        if raw.get(field) not in (None, neutral):
            raise CheckpointError(f"{path}: {field}={raw[field]!r} is not supported by this server's Qwen2 decoder")
    norm = raw.get("norm_class_name", "LayerNorm")
    mlp = raw.get("mlp_class_name", "GptNeoxMLP")
    if norm != "RMSNorm" or mlp != "LLaMAMLP":
        raise CheckpointError(
            f"{path}: expected norm_class_name RMSNorm and mlp_class_name LLaMAMLP (Qwen2), got {norm} / {mlp}"
        )
    n_head = raw["n_head"]
    head_size = raw.get("head_size") or raw["n_embd"] // n_head
    padding_multiple = raw.get("padding_multiple", 512)
    if raw.get("padded_vocab_size") is None:
        padded_vocab = find_multiple(raw["vocab_size"], padding_multiple)
        vocab = raw["vocab_size"]
    else:
        padded_vocab = raw["padded_vocab_size"]
        vocab = min(raw["vocab_size"], padded_vocab)
    n_query_groups = raw.get("n_query_groups") or n_head
    if n_head % n_query_groups:
        raise CheckpointError(f"{path}: n_head {n_head} is not a multiple of n_query_groups {n_query_groups}")
    rope_n_elem = int(raw.get("rotary_percentage", 0.25) * head_size)
    return LMConfig(
        name=str(raw.get("name", "")),
        n_layer=raw["n_layer"],
        n_embd=raw["n_embd"],
        n_head=n_head,
        n_query_groups=n_query_groups,
        head_size=head_size,
        intermediate_size=raw["intermediate_size"],
        vocab_size=vocab,
        padded_vocab_size=padded_vocab,
        block_size=raw.get("block_size", 4096),
        norm_eps=float(raw.get("norm_eps", 1e-5)),
        rope_base=float(raw.get("rope_base", 10000)),
        rope_n_elem=rope_n_elem,
        rope_condense_ratio=float(raw.get("rope_condense_ratio", 1)),
        attn_bias=bool(raw.get("attn_bias", False)),
        bias=bool(raw.get("bias", True)),
        lm_head_bias=bool(raw.get("lm_head_bias", False)),
        norm_unit_offset="Gemma" in str(raw.get("name", "")),
    )


def _deinterleave_legacy_qkv(tensor: torch.Tensor, cfg: LMConfig) -> torch.Tensor:
    """Legacy ``attn.attn`` keys store [Q(per group), K, V] x groups; we use [Q | K | V]."""
    q_per_kv = cfg.n_head // cfg.n_query_groups
    grouped = tensor.view(cfg.n_query_groups, q_per_kv + 2, cfg.head_size, *tensor.shape[1:])
    q = grouped[:, :q_per_kv].reshape(-1, *tensor.shape[1:])
    k = grouped[:, q_per_kv].reshape(-1, *tensor.shape[1:])
    v = grouped[:, q_per_kv + 1].reshape(-1, *tensor.shape[1:])
    return torch.cat((q, k, v))


def read_lm_state_dict(files: CheckpointFiles, cfg: LMConfig,
                       progress: LoadProgress | None = None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if files.is_unsharded:
        shard_names = [files.index.name]
    else:
        try:
            index = json.loads(files.index.read_text())
            shard_names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise CheckpointError(f'{files.index} must be JSON with a "weight_map" object: {exc}') from exc
    if progress is not None:
        progress.set_total(len(shard_names) + 1)  # the LM's shards and the audio tower's file
    state: dict[str, torch.Tensor] = {}
    for name in shard_names:
        shard = files.root / name
        if not shard.is_file():
            raise CheckpointError(f"{shard} is missing: listed in {files.index.name}")
        try:
            state.update(load_file(str(shard)))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{shard} is not a readable safetensors file: {exc}") from exc
        if progress is not None:
            progress.advance()
    for key in [k for k in state if ".attn.attn." in k]:
        state[key.replace(".attn.attn.", ".attn.qkv.")] = _deinterleave_legacy_qkv(state.pop(key), cfg)
    if "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]  # tied checkpoints, as LitGPT converts them
    return state


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict(strict=True)`` with a readable error listing what is wrong."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched[:3])}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match the model config: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)


def load_lm(files: CheckpointFiles, device: torch.device, dtype: torch.dtype,
            progress: LoadProgress | None = None) -> AudioInteractionLM:
    cfg = parse_lm_config(files.model_config)
    with torch.device("meta"):
        model = AudioInteractionLM(cfg)
    model = model.to_empty(device="cpu")
    load_strict(model, read_lm_state_dict(files, cfg, progress), files.index)
    return model.to(device=device, dtype=dtype).eval()


def load_audio_config(files: CheckpointFiles) -> AudioTowerConfig:
    """``thinker_config.audio_config`` of ``qwen25OmniConfig/config.json``, read as JSON: the tower needs a dozen
    numbers of it, and transformers' ``AutoConfig`` would import its whole Omni package for them."""
    path = files.omni_config_dir / "config.json"
    try:
        omni = json.loads(path.read_text())
        if not isinstance(omni, dict) or omni.get("model_type") != "qwen2_5_omni":
            raise ValueError(f"model_type is {omni.get('model_type') if isinstance(omni, dict) else None!r}, "
                             "expected 'qwen2_5_omni'")
        thinker = omni.get("thinker_config")
        if not isinstance(thinker, dict) or "audio_config" not in thinker:
            raise ValueError("it has no thinker_config.audio_config")
        return AudioTowerConfig.from_json(thinker["audio_config"])
    except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is not a Qwen2.5-Omni config with a usable thinker_config.audio_config: "
                              f"{exc}") from exc


def _torch_load_reason(exc: BaseException) -> str:
    """torch.load's own reason in one line, without its advice: the weights-only refusal suggests loading with
    ``weights_only=False`` (running whatever the file holds) and filing an issue with PyTorch, neither of which
    applies to a damaged file."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    return reason if len(reason) <= 200 else reason[:199] + "…"


def load_audio_encoder(files: CheckpointFiles, device: torch.device, dtype: torch.dtype | None) -> AudioTower:
    """The audio tower; ``dtype=None`` keeps the config's own dtype (the reference's behaviour)."""
    config = load_audio_config(files)
    # Storage in the config's dtype first (the weights are rounded to it), as the reference's _from_config makes it.
    tower = AudioTower.unfilled(config, "cpu", config.dtype)
    try:
        state = torch.load(files.encoder_weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign pickle
        raise CheckpointError(f"{files.encoder_weights} is not a readable torch state dict (damaged, cut short, "
                              f"or not saved by torch.save): {_torch_load_reason(exc)}; download it again") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{files.encoder_weights} must hold a plain state dict, got {type(state).__name__}")
    # The sinusoidal positions are a non-persistent buffer; only parameters are in the file.
    load_strict(tower, state, files.encoder_weights)
    tower = tower.to(device)
    if dtype is not None:
        tower = tower.to(dtype)
    return tower.eval()


@dataclass
class LoadedModel:
    """Everything the worker needs from a checkpoint directory."""

    files: CheckpointFiles
    lm: AudioInteractionLM
    encoder_tower: AudioTower
    tokenizer: Any  # tokenizers.Tokenizer
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return self.lm.cfg.name or self.files.root.name


# The weight types this server runs (engine.dtype's choices); "auto": bfloat16 on a GPU, float32 on CPU.
MODEL_DTYPES = ("auto", "float32", "bfloat16")


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if dtype not in MODEL_DTYPES:  # getattr(torch, "fp16") raised AttributeError; "float16" loaded, unsupported
        raise CheckpointError(f"dtype {dtype!r} is not one this server runs: use {', '.join(MODEL_DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' was requested but torch sees no CUDA device")
    if device == "cuda":
        from audio_interaction_server.model.fit import UnsupportedGPU, check_gpu_supported

        try:
            check_gpu_supported(torch.device(device))
        except UnsupportedGPU as error:
            raise CheckpointError(str(error)) from None
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def load_model(root: Path, device: str = "auto", dtype: str = "auto",
               progress: LoadProgress | None = None, tokenizer: Any = None) -> LoadedModel:
    """``progress`` (model/progress.py) counts the weight files read: the log and ``/ready`` show it.
    ``tokenizer``: the checkpoint's, where the caller loaded it already (to check a budget before the weights)."""
    files = resolve_files(Path(root))
    torch_device, torch_dtype = resolve_device(device, dtype)
    progress = progress or LoadProgress()
    progress.begin("loading", "shards", what=f"the weights from {root}")
    lm = load_lm(files, torch_device, torch_dtype, progress)
    # fp32 keeps the encoder exact on CPU; on GPU it follows the LM's dtype.
    encoder = load_audio_encoder(files, torch_device, torch_dtype)
    progress.advance()
    progress.finish()
    if tokenizer is None:
        tokenizer = load_tokenizer(files)
    log.info("loaded %s from %s on %s (%s)", lm.cfg.name, root, torch_device, torch_dtype)
    return LoadedModel(files, lm, encoder, tokenizer, torch_device, torch_dtype)
