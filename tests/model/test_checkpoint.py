"""Loading the release layout: the tiny generated checkpoint, both encoder names, readable errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from audio_interaction_server.model import checkpoint as ckpt
from audio_interaction_server.model.encoder import AudioEncoder
from audio_interaction_server.model.lm import StepBatch


@pytest.fixture()
def checkpoint_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    return copy


def test_tiny_checkpoint_has_the_release_layout(tiny_checkpoint: Path):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"model_config.yaml", "model.safetensors.index.json", "audiointeraction_ChunkwisedEncoder.pth",
            "qwen25OmniConfig", "tokenizer.json", "tokenizer_config.json"} <= names
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    raw = yaml.safe_load((tiny_checkpoint / "model_config.yaml").read_text())
    assert set(raw) <= ckpt.LITGPT_FIELDS and raw["padded_vocab_size"] == 151936


def test_generator_is_seeded(tmp_path: Path, tiny_checkpoint: Path):
    from safetensors.torch import load_file

    from audio_interaction_server.demo.make_tiny_checkpoint import PRESETS, write_lm

    write_lm(tmp_path, PRESETS["tiny"], torch.Generator().manual_seed(0))
    shard = "model-00001-of-00002.safetensors"
    a, b = load_file(str(tmp_path / shard)), load_file(str(tiny_checkpoint / shard))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loads_and_runs(tiny_model):
    assert tiny_model.lm.cfg.padded_vocab_size == 151936
    embeds = AudioEncoder(tiny_model.encoder_tower).encode(torch.randn(2, 128, 40))
    assert embeds.shape == (2, 10, tiny_model.lm.cfg.n_embd)
    cache = tiny_model.lm.new_cache(1, 128)
    tokens = [151647] + [151608] * 10 + [151602]
    logits = tiny_model.lm(StepBatch.build([tokens], [0], [0], [[(1, 11)]], embeds[0], torch.device("cpu")), cache)
    assert logits.shape == (1, 151936) and torch.isfinite(logits).all()


def test_accepts_the_old_encoder_file_name(checkpoint_copy: Path):
    (checkpoint_copy / "audiointeraction_ChunkwisedEncoder.pth").rename(
        checkpoint_copy / "MiniOmni3_ChunkwisedEncoder.pth")
    files = ckpt.resolve_files(checkpoint_copy)
    assert files.encoder_weights.name == "MiniOmni3_ChunkwisedEncoder.pth"
    ckpt.load_audio_encoder(files, torch.device("cpu"), None)


def test_legacy_interleaved_qkv_is_reassembled(checkpoint_copy: Path, tiny_model):
    from safetensors.torch import load_file, save_file

    cfg = tiny_model.lm.cfg
    q_per_kv, d = cfg.n_head // cfg.n_query_groups, cfg.head_size
    index = json.loads((checkpoint_copy / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        state = load_file(str(checkpoint_copy / shard))
        for key in [k for k in state if ".attn.qkv." in k]:
            q, k, v = state.pop(key).split([cfg.n_head * d, cfg.n_query_groups * d, cfg.n_query_groups * d])
            rest = q.shape[1:]
            groups = [torch.cat((q.view(cfg.n_query_groups, q_per_kv * d, *rest)[g],
                                 k.view(cfg.n_query_groups, d, *rest)[g], v.view(cfg.n_query_groups, d, *rest)[g]))
                      for g in range(cfg.n_query_groups)]
            state[key.replace(".attn.qkv.", ".attn.attn.")] = torch.cat(groups)
        save_file(state, str(checkpoint_copy / shard))
    legacy = ckpt.load_lm(ckpt.resolve_files(checkpoint_copy), torch.device("cpu"), torch.float32)
    for name, tensor in tiny_model.lm.state_dict().items():
        assert torch.equal(legacy.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: shutil.rmtree(d / "qwen25OmniConfig"), "qwen25OmniConfig is missing"),
        (lambda d: (d / "model.safetensors.index.json").unlink(), "model.safetensors.index.json is missing"),
        (lambda d: (d / "audiointeraction_ChunkwisedEncoder.pth").unlink(),
         "audiointeraction_ChunkwisedEncoder.pth or MiniOmni3_ChunkwisedEncoder.pth is missing"),
        (lambda d: (d / "model-00002-of-00002.safetensors").unlink(), "model-00002-of-00002.safetensors is missing"),
        (lambda d: (d / "model-00001-of-00002.safetensors").write_bytes(b"garbage"), "not a readable safetensors"),
        (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        (lambda d: (d / "model.safetensors.index.json").write_text("{}"), "weight_map"),
        (lambda d: (d / "audiointeraction_ChunkwisedEncoder.pth").write_bytes(b"xx"), "not a readable torch state"),
    ],
)
def test_broken_layouts_give_one_readable_error(checkpoint_copy: Path, damage, message):
    damage(checkpoint_copy)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_model(checkpoint_copy, "cpu", "float32")


def edit_yaml(path: Path, **changes) -> None:
    raw = yaml.safe_load(path.read_text())
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw))


def test_shape_mismatch_names_the_tensor(checkpoint_copy: Path):
    edit_yaml(checkpoint_copy / "model_config.yaml", intermediate_size=200)
    with pytest.raises(ckpt.CheckpointError, match=r"shape mismatch: transformer\.h\.0\.mlp\.fc_1\.weight"):
        ckpt.load_model(checkpoint_copy, "cpu", "float32")


def test_unknown_config_field_is_rejected(checkpoint_copy: Path):
    edit_yaml(checkpoint_copy / "model_config.yaml", rope_indices=[0, 1])
    with pytest.raises(ckpt.CheckpointError, match="model_config.yaml has fields .* rope_indices"):
        ckpt.load_model(checkpoint_copy, "cpu", "float32")


def test_unsupported_architecture_is_rejected(checkpoint_copy: Path):
    edit_yaml(checkpoint_copy / "model_config.yaml", parallel_residual=True)
    with pytest.raises(ckpt.CheckpointError, match="parallel_residual"):
        ckpt.load_model(checkpoint_copy, "cpu", "float32")


def test_missing_layout_files_and_missing_shards_are_named_in_one_line(checkpoint_copy: Path):
    """A missing shard was named only on the next start, once the missing layout files were back (first-hour
    review, 2026-12-06): fixing a download one error at a time costs a start each."""
    (checkpoint_copy / "tokenizer.json").unlink()
    (checkpoint_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_model(checkpoint_copy, "cpu", "float32")
    message = str(error.value)
    assert "tokenizer.json is missing" in message and "model-00002-of-00002.safetensors is missing" in message
    assert len(message.splitlines()) == 1


def test_an_empty_folder_names_every_missing_file(tmp_path: Path):
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_model(tmp_path, "cpu", "float32")
    message = str(error.value)
    for name in ("model_config.yaml", "model.safetensors.index.json",
                 "audiointeraction_ChunkwisedEncoder.pth or MiniOmni3_ChunkwisedEncoder.pth", "qwen25OmniConfig",
                 "tokenizer.json"):
        assert f"{name} is missing" in message, name
    assert "tokenizer_config.json" not in message  # optional: the server does not read it
    assert len(message.splitlines()) == 1


def test_missing_directory():
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_model(Path("/nonexistent/ckpt"), "cpu", "float32")


CUDA13_ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"]


def fake_gpu(monkeypatch, capability: tuple[int, int], arch_list: list[str], name: str = "Tesla V100-SXM2-16GB"):
    """No GPU here: torch's own CUDA queries answer as a host with this GPU and this torch build would."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_a_gpu_older_than_the_torch_build_supports_is_refused_at_start_up(monkeypatch, device):
    fake_gpu(monkeypatch, (7, 0), CUDA13_ARCHES)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.resolve_device(device, "auto")
    message = str(error.value)
    assert "Tesla V100-SXM2-16GB" in message and "compute capability 7.0" in message
    assert "needs 7.5 or newer" in message and "device cpu" in message


def test_a_supported_gpu_is_accepted(monkeypatch):
    fake_gpu(monkeypatch, (7, 5), CUDA13_ARCHES, name="Tesla T4")
    import torch

    assert ckpt.resolve_device("auto", "auto") == (torch.device("cuda"), torch.bfloat16)


def test_without_an_arch_list_the_cuda_13_minimum_applies(monkeypatch):
    fake_gpu(monkeypatch, (6, 1), [], name="NVIDIA GeForce GTX 1080")
    with pytest.raises(ckpt.CheckpointError, match="compute capability 6.1.*needs 7.5 or newer"):
        ckpt.resolve_device("cuda", "auto")


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1280000000\n")


@pytest.mark.parametrize("name", ["model-00002-of-00002.safetensors", "audiointeraction_ChunkwisedEncoder.pth",
                                  "tokenizer.json"])
def test_git_lfs_pointers_are_named_before_a_weight_is_read(checkpoint_copy: Path, name: str):
    """`git clone` of the Hub's repo without Git LFS leaves pointer files; the .pth one got torch's advice to load
    with weights_only=False and to file an issue with PyTorch, a shard 'header too large' (first-hour round 9)."""
    (checkpoint_copy / name).write_text(LFS_POINTER)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.resolve_files(checkpoint_copy)
    message = str(error.value)
    assert f"{name} is a Git LFS pointer" in message and "git lfs pull" in message
    assert len(message.splitlines()) == 1


def test_an_html_page_saved_as_the_encoder_is_named(checkpoint_copy: Path):
    (checkpoint_copy / "audiointeraction_ChunkwisedEncoder.pth").write_text("<!DOCTYPE html>\n<html><body>x</body>")
    with pytest.raises(ckpt.CheckpointError, match="audiointeraction_ChunkwisedEncoder.pth is an HTML page"):
        ckpt.load_model(checkpoint_copy, "cpu", "float32")


def test_a_damaged_encoder_file_is_one_line_without_torchs_weights_only_advice(checkpoint_copy: Path):
    (checkpoint_copy / "audiointeraction_ChunkwisedEncoder.pth").write_bytes(b"garbage that is no pickle")
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_model(checkpoint_copy, "cpu", "float32")
    message = str(error.value)
    assert "not a readable torch state dict" in message and "download it again" in message
    assert "weights_only" not in message and "file an issue" not in message
    assert len(message.splitlines()) == 1


def test_the_folder_above_a_checkpoint_names_it(tiny_checkpoint: Path, tmp_path: Path):
    """`--checkpoint models` for models/AudioInteraction, or a Hugging Face cache's models--owner--name (the files are
    in snapshots/<commit>/): every file was named missing, with no word of where they are (first-hour round 9)."""
    shutil.copytree(tiny_checkpoint, tmp_path / "models" / "AudioInteraction")
    shutil.copytree(tiny_checkpoint, tmp_path / "models--o--n" / "snapshots" / "0123abc")
    for given, holder in ((tmp_path / "models", tmp_path / "models" / "AudioInteraction"),
                          (tmp_path / "models--o--n", tmp_path / "models--o--n" / "snapshots" / "0123abc")):
        with pytest.raises(ckpt.CheckpointError) as error:
            ckpt.resolve_files(given)
        message = str(error.value)
        assert f"{holder} holds the layout: pass it as the checkpoint" in message, message
        assert len(message.splitlines()) == 1


def test_model_config_that_is_not_yaml_is_one_line_naming_the_file_and_the_place(checkpoint_copy: Path):
    config = checkpoint_copy / "model_config.yaml"
    config.write_text("name: x\nn_layer: [\n")
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.parse_lm_config(config)
    message = str(error.value)
    assert "\n" not in message and "<unicode string>" not in message, message
    assert message.startswith(f"{config} is not valid YAML (line 3, column 1): "), message


def test_an_unsharded_model_safetensors_without_an_index_loads_as_the_shards_do(checkpoint_copy: Path, tiny_model):
    """A checkpoint of one's own often holds its LM in one ``model.safetensors`` without an index (safetensors'
    ``save_file`` with the release's LitGPT tensor names): it was refused as "model.safetensors.index.json is missing"
    (first-hour review, round 15). It now loads, to the same weights as the release's shards."""
    from safetensors.torch import load_file, save_file

    index = json.loads((checkpoint_copy / "model.safetensors.index.json").read_text())
    tensors: dict = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(checkpoint_copy / shard)))
        (checkpoint_copy / shard).unlink()
    (checkpoint_copy / "model.safetensors.index.json").unlink()
    save_file(tensors, str(checkpoint_copy / "model.safetensors"))
    model = ckpt.load_model(checkpoint_copy, "cpu", "float32")
    expected = tiny_model.lm.state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in model.lm.state_dict().items())
    # Damaged, it is named as a shard is.
    (checkpoint_copy / "model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors is not a readable safetensors file"):
        ckpt.load_model(checkpoint_copy, "cpu", "float32")


def test_a_tokenizer_json_that_is_json_of_another_kind_is_said_to_be_so(checkpoint_copy: Path):
    """A tokenizer_config.json copied over tokenizer.json was refused with tokenizers' serde error, "expected `,` or
    `}` at line 1 column ...", which reads as broken JSON where the JSON was fine (first-hour review, round 15)."""
    (checkpoint_copy / "tokenizer.json").write_text((checkpoint_copy / "tokenizer_config.json").read_text())
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_model(checkpoint_copy, "cpu", "float32")
    message = str(error.value)
    assert 'it is JSON, but not a tokenizer: no "model" section' in message and "expected" not in message
    assert len(message.splitlines()) == 1
    # JSON nested past Python's recursion limit is not a tokenizer either, said as tokenizers' own error, in one line
    (checkpoint_copy / "tokenizer.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ckpt.CheckpointError, match="is not a HF tokenizers file"):
        ckpt.load_model(checkpoint_copy, "cpu", "float32")
