"""The audio tower: many sessions' chunks in one call == one call per chunk == the reference's call, and our
tower module == transformers' ``Qwen2_5OmniAudioEncoder`` loaded from the same files the reference's way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from audio_interaction_server.model import checkpoint as ckpt
from audio_interaction_server.model.encoder import AudioEncoder, AudioTowerConfig, sinusoid_positions


def reference_tower(files: ckpt.CheckpointFiles, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The reference's audio tower: ``AutoConfig`` -> ``thinker_config.audio_config`` ->
    ``Qwen2_5OmniAudioEncoder._from_config``, the ``.pth`` loaded strictly (model-notes 1.4)."""
    from transformers import AutoConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        audio_config = AutoConfig.from_pretrained(str(files.omni_config_dir)).thinker_config.audio_config
    finally:
        hf_logging.set_verbosity(verbosity)
    audio_config._attn_implementation = "sdpa"
    tower = Qwen2_5OmniAudioEncoder._from_config(audio_config)
    tower.load_state_dict(torch.load(files.encoder_weights, map_location="cpu", weights_only=True), strict=True)
    return (tower if dtype is None else tower.to(dtype)).eval()


@pytest.fixture(scope="module")
def transformers_tower(tiny_checkpoint: Path) -> torch.nn.Module:
    return reference_tower(ckpt.resolve_files(tiny_checkpoint), torch.float32)


def test_batched_chunks_equal_single_chunks(tiny_model, stream_chunks):
    encoder = AudioEncoder(tiny_model.encoder_tower)
    chunks = torch.cat([s[:3] for s in stream_chunks[:3]])  # chunks of three different streams
    together = encoder.encode(chunks)
    alone = torch.cat([encoder.encode(chunks[i:i + 1]) for i in range(len(chunks))])
    assert together.shape == (9, 10, tiny_model.lm.cfg.n_embd)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_matches_the_reference_call_convention(tiny_model, transformers_tower, stream_chunks):
    """The reference passes one (128, T) mel with feature_lens=[40]*n and a scalar aftercnn_lens."""
    chunks = stream_chunks[0][:5]
    mel = chunks.permute(1, 0, 2).reshape(128, -1)
    with torch.inference_mode():
        expected = transformers_tower(
            input_features=mel, feature_lens=torch.full((5,), 40), aftercnn_lens=torch.tensor((200 - 1) // 2 + 1),
        ).last_hidden_state
    torch.testing.assert_close(AudioEncoder(tiny_model.encoder_tower).encode(chunks).flatten(0, 1), expected)


def test_rejects_wrong_shapes(tiny_model):
    import pytest

    with pytest.raises(ValueError, match=r"\(N, 128, 40\)"):
        AudioEncoder(tiny_model.encoder_tower).encode(torch.zeros(2, 128, 39))


def test_batch_buckets_are_few_and_waste_at_most_a_third():
    from audio_interaction_server.model.encoder import batch_bucket

    buckets = [batch_bucket(n) for n in range(1, 513)]
    assert sorted(set(buckets)) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    assert all(n <= b < 1.5 * n or b - n <= 1 for n, b in zip(range(1, 513), buckets))


def test_padding_to_a_bucket_leaves_the_real_chunks_unchanged(tiny_model, stream_chunks):
    chunks = torch.cat([s[:3] for s in stream_chunks[:3]])[:5]  # 5 chunks -> padded to 6
    padded = AudioEncoder(tiny_model.encoder_tower, pad_to_buckets=True).encode(chunks)
    exact = AudioEncoder(tiny_model.encoder_tower, pad_to_buckets=False).encode(chunks)
    assert padded.shape == exact.shape == (5, 10, tiny_model.lm.cfg.n_embd)
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)


def test_batched_forward_equals_the_towers_own_forward_for_many_streams(tiny_model, transformers_tower,
                                                                        stream_chunks):
    """Our tower runs the chunks as one (N, 20, D) batch; transformers' packs them and loops over them."""
    chunks = torch.cat([s[:8] for s in stream_chunks])  # 48 chunks of six recordings
    mel = chunks.permute(1, 0, 2).reshape(128, -1)
    with torch.inference_mode():
        expected = transformers_tower(
            input_features=mel, feature_lens=torch.full((len(chunks),), 40),
            aftercnn_lens=torch.full((len(chunks),), 20),
        ).last_hidden_state
    got = AudioEncoder(tiny_model.encoder_tower, pad_to_buckets=False).encode(chunks)
    torch.testing.assert_close(got.flatten(0, 1), expected)


def test_the_position_table_is_bit_equal_to_the_references():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import SinusoidsPositionEmbedding

    for length, channels in ((1500, 64), (1500, 1280), (30, 6)):
        assert torch.equal(sinusoid_positions(length, channels),
                           SinusoidsPositionEmbedding(length, channels).positional_embedding), (length, channels)


def with_audio_config(checkpoint: Path, out: Path, **changes) -> ckpt.CheckpointFiles:
    """A copy of ``checkpoint`` whose ``thinker_config.audio_config`` has ``changes`` (None: the key removed)."""
    shutil.copytree(checkpoint, out)
    path = out / "qwen25OmniConfig" / "config.json"
    omni = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            omni["thinker_config"]["audio_config"].pop(key, None)
        else:
            omni["thinker_config"]["audio_config"][key] = value
    path.write_text(json.dumps(omni))
    return ckpt.resolve_files(out)


@pytest.mark.parametrize("config_dtype", [None, "bfloat16", "float16"])
@pytest.mark.parametrize("serving_dtype", [None, torch.float32, torch.bfloat16])
def test_the_loaded_tower_equals_transformers_in_every_dtype_a_config_and_server_name(
        tiny_checkpoint, stream_chunks, tmp_path, config_dtype, serving_dtype):
    """The weights are made in the config's dtype first (a bf16 config rounds fp32 weights even for an fp32
    server), then take the server's; both as the reference's ``_from_config`` and ``.to()`` do."""
    files = with_audio_config(tiny_checkpoint, tmp_path / "ckpt", dtype=config_dtype)
    ours = ckpt.load_audio_encoder(files, torch.device("cpu"), serving_dtype)
    theirs = reference_tower(files, serving_dtype)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for name, tensor in theirs.state_dict().items():
        assert tensor.dtype == ours.state_dict()[name].dtype and torch.equal(tensor, ours.state_dict()[name]), name
    chunks = stream_chunks[1][:4]
    with torch.inference_mode():
        expected = theirs(input_features=chunks.permute(1, 0, 2).reshape(128, -1),
                          feature_lens=torch.full((4,), 40), aftercnn_lens=torch.full((4,), 20)).last_hidden_state
    got = AudioEncoder(ours, pad_to_buckets=False).encode(chunks).flatten(0, 1)
    if expected.dtype == torch.float32:
        torch.testing.assert_close(got, expected)
    else:  # 16-bit: one batched attention call against a loop of them; same order of operations elsewhere
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_the_older_torch_dtype_key_is_read_too(tiny_checkpoint, tmp_path):
    files = with_audio_config(tiny_checkpoint, tmp_path / "ckpt", dtype=None, torch_dtype="bfloat16")
    assert ckpt.load_audio_config(files).dtype == torch.bfloat16
    assert ckpt.load_audio_encoder(files, torch.device("cpu"), None).conv1.weight.dtype == torch.bfloat16


def test_fields_a_config_leaves_out_take_the_references_defaults(tiny_checkpoint, tmp_path):
    files = with_audio_config(tiny_checkpoint, tmp_path / "ckpt", n_window=None, max_source_positions=None)
    config = ckpt.load_audio_config(files)
    assert (config.n_window, config.max_source_positions) == (100, 1500)
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniAudioEncoderConfig

    defaults = Qwen2_5OmniAudioEncoderConfig()
    ours = AudioTowerConfig()
    for name in ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                 "max_source_positions", "n_window", "output_dim", "activation_function"):
        assert getattr(ours, name) == getattr(defaults, name), name


@pytest.mark.parametrize("changes, message", [
    (dict(activation_function="relu"), "activation_function is 'relu'"),
    (dict(num_mel_bins=80), "num_mel_bins is 80"),
    (dict(n_window=10), r"n_window \(10\) would cut a 40-frame chunk"),
    (dict(d_model="64"), "d_model is '64', expected a positive integer"),
    (dict(dtype="float64"), "dtype is 'float64'"),
    (dict(encoder_attention_heads=5), r"multiple of encoder_attention_heads \(5\)"),
])
def test_a_config_the_tower_cannot_be_built_from_is_one_clear_error(tiny_checkpoint, tmp_path, changes, message):
    files = with_audio_config(tiny_checkpoint, tmp_path / "ckpt", **changes)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_audio_encoder(files, torch.device("cpu"), None)


def test_a_config_that_is_not_qwen_omni_is_refused_naming_the_file(tiny_checkpoint, tmp_path):
    files = with_audio_config(tiny_checkpoint, tmp_path / "ckpt")
    path = files.omni_config_dir / "config.json"
    omni = json.loads(path.read_text())
    path.write_text(json.dumps(dict(omni, model_type="qwen2")))
    with pytest.raises(ckpt.CheckpointError, match=r"config\.json is not a Qwen2\.5-Omni config.*'qwen2'"):
        ckpt.load_audio_config(files)
    path.write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=r"config\.json is not a Qwen2\.5-Omni config"):
        ckpt.load_audio_config(files)
    path.write_text(json.dumps(dict(omni, thinker_config={})))
    with pytest.raises(ckpt.CheckpointError, match="no thinker_config.audio_config"):
        ckpt.load_audio_config(files)

