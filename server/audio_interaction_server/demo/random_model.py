"""Random weights of a preset's shapes, built directly on the device (benchmarks).

``make_tiny_checkpoint --preset real`` writes ~13.6 GB of shards to prove the
loader on the real layout; a throughput run only needs the real *shapes* on
the GPU, so this builds the same modules there in the serving dtype and fills
them with seeded noise, reusing the demo checkpoint's tokenizer.

    python -m audio_interaction_server.demo.random_model --preset real --device cuda   # prints the parameter counts
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import torch
import yaml

from audio_interaction_server.model.checkpoint import (
    MODEL_DTYPES, LoadedModel, load_tokenizer, parse_lm_config, resolve_device, resolve_files,
)
from audio_interaction_server.model.encoder import AudioTower, AudioTowerConfig
from audio_interaction_server.model.layout import CheckpointError
from audio_interaction_server.model.lm import AudioInteractionLM
from audio_interaction_server.demo.make_tiny_checkpoint import PRESETS, ensure_demo_checkpoint

log = logging.getLogger(__name__)


def random_model(preset: str = "real", device: str = "auto", dtype: str = "auto", seed: int = 0) -> LoadedModel:
    chosen = PRESETS[preset]
    torch_device, torch_dtype = resolve_device(device, dtype)
    files = resolve_files(ensure_demo_checkpoint())
    with tempfile.TemporaryDirectory() as scratch:
        config_path = Path(scratch) / "model_config.yaml"
        config_path.write_text(yaml.safe_dump(chosen.lm, sort_keys=False))
        cfg = parse_lm_config(config_path)
    # Meta first, then storage in the serving dtype: a 3B model is never materialised in fp32.
    with torch.device("meta"):
        lm = AudioInteractionLM(cfg)
    lm = lm.to(torch_dtype).to_empty(device=torch_device)
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    _fill(lm, generator, std=0.02)
    encoder = _random_audio_tower(chosen.audio, torch_device, torch_dtype, generator)
    log.info("random %s model on %s (%s): LM %.2fB, audio tower %.2fB parameters", preset, torch_device,
             torch_dtype, _count(lm) / 1e9, _count(encoder) / 1e9)
    return LoadedModel(files, lm.eval(), encoder.eval(), load_tokenizer(files), torch_device, torch_dtype)


def _random_audio_tower(audio: dict, device: torch.device, dtype: torch.dtype,
                        generator: torch.Generator) -> AudioTower:
    tower = AudioTower.unfilled(AudioTowerConfig.from_json(audio), device, dtype)
    _fill(tower, generator, std=0.02)
    return tower


@torch.no_grad()
def _fill(module: torch.nn.Module, generator: torch.Generator, std: float) -> None:
    for name, param in sorted(module.named_parameters()):  # sorted: the seed alone decides every value
        if "norm" in name or name.endswith("ln_post.weight"):
            param.normal_(1.0, 0.1, generator=generator) if name.endswith("weight") else param.zero_()
        else:
            param.normal_(0.0, std, generator=generator)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="real")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        random_model(args.preset, args.device, args.dtype)
    except CheckpointError as error:  # --device cuda without one, a dtype the device lacks: one line
        parser.exit(2, f"error: {error}\n")


if __name__ == "__main__":
    main()
