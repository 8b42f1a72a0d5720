"""Write a seeded random Audio-Interaction checkpoint in the exact release layout.

    python -m audio_interaction_server.demo.make_tiny_checkpoint OUT_DIR [--preset tiny|real] [--seed 0]
                                                                 [--dtype float32|bfloat16]

``tiny`` is a few-MB decoder (plus the real 151,936-row padded vocabulary, so
every real control id exists) for tests and the no-weights demo; ``real`` has
the release's Qwen2.5-3B / Omni audio-tower shapes with random weights, for
throughput benchmarks. The same loader reads these and the released weights. ``--dtype bfloat16``
stores the same seeded values rounded to bf16 (the loader casts to its own dtype, as it does for any
checkpoint): half the bytes to write and read, about 7.5 GB for ``real``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from audio_interaction_server.spec import TEXT_END

if TYPE_CHECKING:  # torch and transformers are imported where they are used: they take seconds
    import torch
    from transformers import Qwen2_5OmniConfig
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    lm: dict
    audio: dict
    num_shards: int
    text_end_logit_scale: float = 1.0


# LitGPT field names, as the release's model_config.yaml spells them.
_QWEN_COMMON = dict(
    vocab_size=151643,
    padded_vocab_size=151936,
    padding_multiple=512,
    norm_class_name="RMSNorm",
    norm_eps=1e-6,
    mlp_class_name="LLaMAMLP",
    rope_base=1000000,
    rotary_percentage=1.0,
    parallel_residual=False,
    bias=False,
    attn_bias=True,
    lm_head_bias=False,
)

PRESETS = {
    "tiny": Preset(
        lm=dict(name="audio-interaction-tiny", block_size=8192, n_layer=2, n_embd=64, n_head=4,
                n_query_groups=2, head_size=16, intermediate_size=160, **_QWEN_COMMON),
        audio=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                   output_dim=64, num_mel_bins=128, n_window=100, max_source_positions=1500),
        num_shards=2,
        text_end_logit_scale=3.0,
    ),
    "real": Preset(
        lm=dict(name="Qwen2.5-3B", hf_config={"org": "Qwen", "name": "Qwen2.5-3B"}, block_size=32768,
                n_layer=36, n_embd=2048, n_head=16, n_query_groups=2, head_size=128,
                intermediate_size=11008, **_QWEN_COMMON),
        audio=dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                   output_dim=2048, num_mel_bins=128, n_window=100, max_source_positions=1500),
        num_shards=4,
    ),
}


def _random_tensors(state: dict[str, torch.Tensor], generator: torch.Generator, std: float
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """A random float32 tensor of each shape in ``state``, drawn in the names' sorted order (the seed alone decides
    every value), one at a time."""
    import torch

    for name in sorted(state):
        shape = state[name].shape
        if name.endswith("norm_1.weight") or name.endswith("norm_2.weight") or name.endswith("ln_f.weight") \
                or name.endswith("layer_norm.weight") or name.endswith("ln_post.weight"):
            yield name, 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            yield name, std * torch.randn(shape, generator=generator)


def _random_like(state: dict[str, torch.Tensor], generator: torch.Generator, std: float) -> dict[str, torch.Tensor]:
    return dict(_random_tensors(state, generator, std))


def save_readable(tensors: dict, path: Path) -> None:
    """A safetensors file, readable by all as the checkpoint's other files are: safetensors creates it owner-only
    (0600), and a checkpoint made on the host is read by the container's own user."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)


def write_lm(out: Path, preset: Preset, generator: torch.Generator, dtype: str = "float32") -> None:
    import torch

    from audio_interaction_server.model.checkpoint import parse_lm_config
    from audio_interaction_server.model.lm import AudioInteractionLM

    (out / "model_config.yaml").write_text(yaml.safe_dump(preset.lm, sort_keys=False))
    cfg = parse_lm_config(out / "model_config.yaml")
    with torch.device("meta"):
        shapes = AudioInteractionLM(cfg).state_dict()
    stored = getattr(torch, dtype)  # the generator's float32 values, rounded to what is stored
    std = 0.02 if preset is PRESETS["real"] else 0.2
    # One shard at a time, each tensor rounded to the stored type as it is drawn: the real preset's float32 values
    # are 13.6 GB at once, which a 16 GB machine does not have. The shards hold consecutive names in sorted order,
    # the order the generator draws them in, so the values are those of drawing every tensor first.
    names = sorted(shapes)
    per_shard = -(-len(names) // preset.num_shards)
    weight_map = {}
    for i in range(preset.num_shards):
        shard = f"model-{i + 1:05d}-of-{preset.num_shards:05d}.safetensors"
        part = {}
        for name, values in _random_tensors({n: shapes[n] for n in names[i * per_shard:(i + 1) * per_shard]},
                                            generator, std):
            if name == "lm_head.weight" and preset.text_end_logit_scale != 1.0:
                # A purely random head almost never ranks TEXT_END first, so every reply would run to the
                # turn cap; a larger TEXT_END row lets random replies end on their own too.
                values[TEXT_END] *= preset.text_end_logit_scale
            part[name] = values.to(stored).contiguous()
        save_readable(part, out / shard)
        weight_map.update({n: shard for n in part})
        del part
    total = sum(shapes[n].numel() * stored.itemsize for n in names)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )


def audio_config_of(omni: Qwen2_5OmniConfig) -> Qwen2_5OmniAudioEncoderConfig:
    """``omni.thinker_config.audio_config`` with its real type.

    transformers declares sub-configs as ``dict | PreTrainedConfig | None``; a built Omni config holds the
    typed ones, and this checks that rather than assuming it.
    """
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import (
        Qwen2_5OmniAudioEncoderConfig, Qwen2_5OmniThinkerConfig,
    )

    thinker = omni.thinker_config
    if not isinstance(thinker, Qwen2_5OmniThinkerConfig):
        raise TypeError(f"thinker_config is a {type(thinker).__name__}, expected Qwen2_5OmniThinkerConfig")
    if not isinstance(thinker.audio_config, Qwen2_5OmniAudioEncoderConfig):
        raise TypeError(f"thinker_config.audio_config is a {type(thinker.audio_config).__name__}, "
                        "expected Qwen2_5OmniAudioEncoderConfig")
    return thinker.audio_config


def write_audio_tower(out: Path, preset: Preset, generator: torch.Generator, dtype: str = "float32") -> None:
    import torch
    from transformers import Qwen2_5OmniConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    from transformers.utils import logging as hf_logging

    # The text config's vocabulary must hold the Omni token ids the config names, as the real one does.
    # transformers still warns about the talker's token ids (outside the tiny vocabulary), which the
    # audio tower never uses: seven lines of noise on a demo's first start, so they are silenced.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        omni = Qwen2_5OmniConfig(thinker_config={"audio_config": preset.audio,
                                                 "text_config": {"vocab_size": preset.lm["padded_vocab_size"]}})
    finally:
        hf_logging.set_verbosity(verbosity)
    omni.save_pretrained(str(out / "qwen25OmniConfig"))
    with torch.device("meta"):
        tower = Qwen2_5OmniAudioEncoder._from_config(audio_config_of(omni))
    shapes = {k: v for k, v in tower.state_dict().items()}
    state = _random_like(shapes, generator, std=0.05)
    torch.save({name: tensor.to(getattr(torch, dtype)) for name, tensor in state.items()},
               out / "audiointeraction_ChunkwisedEncoder.pth")


# torch.Generator.manual_seed takes 0 to 2**64 - 1; it also takes negative seeds, wrapped (-1 is 2**64 - 1), which
# would make two command lines one checkpoint without a word.
MAX_SEED = 2**64 - 1


def make_checkpoint(out: Path, preset: str = "tiny", seed: int = 0, dtype: str = "float32") -> Path:
    import torch

    from audio_interaction_server.demo.qwen_vocab import write_tokenizer_files

    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed {seed}: must be 0 to {MAX_SEED}")
    out = Path(out)
    _remove_dead_staging(out.resolve())  # beside it, or in it (which then counts as empty)
    if out.is_dir() and (held := sorted(path.name for path in out.iterdir())):  # a checkpoint's folder loses nothing
        hidden = [name for name in held if name.startswith(".partial-")]
        why = (f" (it holds {', '.join(hidden)}: the staging folder of a make-checkpoint run still running, or of a "
               "killed one whose process id is in use again: remove it if no run writes there)") if hidden else ""
        raise ValueError(f"{out} is not empty{why}: make-checkpoint writes into a new or empty folder, and "
                         "overwrites nothing")
    chosen = PRESETS[preset]
    # Written into a staging folder beside it, renamed into place once whole: a full disk, a write error or a
    # Ctrl-C leaves nothing behind (a half-written folder was refused by the next run as not empty).
    # An existing (empty) folder is the caller's (a mount point, the cwd, one it may write into but not its parent):
    # it is kept, with the staging folder inside it; else the staging folder is beside it and renamed into place.
    target = out.resolve()
    is_existing = target.is_dir()
    staging = (target / f".partial-{os.getpid()}" if is_existing
               else target.parent / f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    if is_existing:
        # Claimed before anything is written: two runs into one empty folder both passed the check above while the
        # tokenizer was built, then each moved its files over the other's. Each sees the other's staging folder now.
        staging.mkdir()
        if others := sorted(path.name for path in target.iterdir() if path != staging):
            staging.rmdir()
            raise ValueError(f"{out} is not empty (it holds {', '.join(others)}: another make-checkpoint run writes "
                             "there now?): make-checkpoint writes into a new or empty folder, and overwrites nothing")
    try:
        # The tokenizer first: it is what a first run without a package index cannot get. It draws nothing from
        # the generator, so the order keeps the seeded values.
        write_tokenizer_files(staging)
        generator = torch.Generator().manual_seed(seed)
        write_lm(staging, chosen, generator, dtype)
        write_audio_tower(staging, chosen, generator, dtype)
        (staging / "generation_config.json").write_text(json.dumps({"eos_token_id": 151643, "bos_token_id": 151643}))
        if is_existing:
            for entry in staging.iterdir():
                os.replace(entry, target / entry.name)
            staging.rmdir()
        else:
            staging.rename(target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        reason = _write_failure(error, staging.parent)
        if reason is None:
            raise
        raise CheckpointWriteError(f"cannot write the checkpoint to {out}: {reason}; nothing was kept") from None
    log.info("wrote %s checkpoint (seed %d, %s) to %s", preset, seed, dtype, out)
    return out


def _staging_of_ended_runs(folder: Path, pattern: str) -> list[Path]:
    """The staging folders in ``folder`` matching ``pattern`` (each named ``...-<pid>``) whose process has ended: a
    run killed while it wrote. One whose process lives is another run writing now."""
    from audio_interaction_server.demo.qwen_vocab import process_exists

    if not folder.is_dir():
        return []
    ended = []
    for staging in folder.glob(pattern):
        pid = staging.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not process_exists(int(pid)):
            ended.append(staging)
    return ended


def _remove_dead_staging(target: Path) -> None:
    """Staging folders of ``target`` (beside it or in it) whose process has ended: killed while it wrote."""
    for staging in [*_staging_of_ended_runs(target.parent, f".{target.name}.partial-*"),
                    *_staging_of_ended_runs(target, ".partial-*")]:
        shutil.rmtree(staging, ignore_errors=True)


class CheckpointWriteError(Exception):
    """The checkpoint could not be written whole (a full disk, a write error); nothing of it was kept."""


def _write_failure(error: BaseException, folder: Path) -> str | None:
    """What stopped a checkpoint's writing, in words, if it was the file system or memory; None for anything else.
    safetensors reports a failed write as its own error, with the OS's text in it ("os error 28")."""
    text = str(error)
    is_disk_full = (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "os error 28" in text
    if is_disk_full:
        try:
            free_mb = shutil.disk_usage(folder).free / 1e6
        except OSError:
            return "no space left on the device"
        return f"no space left on the device ({free_mb:,.0f} MB free in {folder})"
    if isinstance(error, OSError):
        return error.strerror or text
    if type(error).__name__ == "SafetensorError" and "I/O error" in text:
        return text.rpartition("I/O error: ")[2]
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and "can't allocate memory" in text):
        # torch's allocator says so in a RuntimeError; the real preset draws its largest tensor (1.2 GB) in float32
        return "not enough memory to draw the random weights (the real preset needs a few GB free)"
    return None


CHECKPOINT_DTYPES = ("float32", "bfloat16")

# Bump when the generated layout or values change, so cached demo models are rebuilt.
GENERATOR_VERSION = 3


def ensure_demo_checkpoint(seed: int = 0, cache_dir: Path | None = None) -> Path:
    """The tiny demo checkpoint, generated once into the cache (atomically: a rename publishes it)."""
    from audio_interaction_server.demo.qwen_vocab import cache_dir as default_cache_dir

    root = (cache_dir or default_cache_dir()) / f"demo-tiny-v{GENERATOR_VERSION}-seed{seed}"
    if root.is_dir():
        return root
    _remove_stale_staging(root)
    staging = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    log.info("first start: generating the tiny demo model into %s (it needs the Qwen vocabulary: fetched once "
             "from PyPI's dashscope wheel unless cached; later starts reuse both)", root)
    make_checkpoint(staging, "tiny", seed)
    try:
        staging.rename(root)
    except OSError:  # another process published it first
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _remove_stale_staging(root: Path) -> None:
    """Staging folders of ``root`` whose process has ended (a first start stopped while it generated: ~78 MB
    each), make-checkpoint's own inside them too. One whose process lives is another start generating now."""
    for staging in [*_staging_of_ended_runs(root.parent, f"{root.name}.tmp-*"),
                    *_staging_of_ended_runs(root.parent, f".{root.name}.tmp-*.partial-*")]:
        log.info("removing %s, left by a start that was stopped while it generated the demo model", staging)
        shutil.rmtree(staging, ignore_errors=True)


def seed_value(text: str) -> int:
    """``--seed``'s type: refused by argparse (status 2) before anything is created, not by torch after."""
    try:
        seed: int | None = int(text)
    except ValueError:
        seed = None
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to {MAX_SEED} (got {text})")
    return seed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of this tool, shared with ``audio-interaction make-checkpoint``."""
    parser.add_argument("out", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: an 86 MB test/demo model (its tokenizer included); real: the release's 3B "
                        "shapes, random weights")
    parser.add_argument("--seed", type=seed_value, default=0, help=f"0 to {MAX_SEED}; the same seed, the same bytes")
    parser.add_argument("--dtype", choices=CHECKPOINT_DTYPES, default="float32",
                        help="the stored weights' type: bfloat16 halves a real-size checkpoint (the same seeded "
                        "values, rounded)")


def main(argv: list[str] | None = None) -> None:
    """``audio-interaction make-checkpoint``'s work under the name the benchmarks' messages give, with its one-line
    errors and status 2 (a non-empty or unwritable OUT was a ValueError / CheckpointWriteError traceback here)."""
    from audio_interaction_server.demo.qwen_vocab import VocabUnavailable

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        make_checkpoint(args.out, args.preset, args.seed, args.dtype)
    except (ValueError, VocabUnavailable, CheckpointWriteError) as error:  # the input, no index, a full disk
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
