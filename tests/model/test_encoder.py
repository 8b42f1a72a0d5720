"""The audio tower wrapper: many sessions' chunks in one call == one call per chunk == the reference's call."""

from __future__ import annotations

import torch

from audio_interaction_server.model.encoder import AudioEncoder


def test_batched_chunks_equal_single_chunks(tiny_model, stream_chunks):
    encoder = AudioEncoder(tiny_model.encoder_tower)
    chunks = torch.cat([s[:3] for s in stream_chunks[:3]])  # chunks of three different streams
    together = encoder.encode(chunks)
    alone = torch.cat([encoder.encode(chunks[i:i + 1]) for i in range(len(chunks))])
    assert together.shape == (9, 10, tiny_model.lm.cfg.n_embd)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_matches_the_reference_call_convention(tiny_model, stream_chunks):
    """The reference passes one (128, T) mel with feature_lens=[40]*n and a scalar aftercnn_lens."""
    chunks = stream_chunks[0][:5]
    mel = chunks.permute(1, 0, 2).reshape(128, -1)
    with torch.inference_mode():
        expected = tiny_model.encoder_tower(
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


def test_batched_forward_equals_the_towers_own_forward_for_many_streams(tiny_model, stream_chunks):
    """The encoder runs the tower's modules as one (N, 20, D) batch; the tower itself packs and loops chunks."""
    chunks = torch.cat([s[:8] for s in stream_chunks])  # 48 chunks of six recordings
    mel = chunks.permute(1, 0, 2).reshape(128, -1)
    with torch.inference_mode():
        expected = tiny_model.encoder_tower(
            input_features=mel, feature_lens=torch.full((len(chunks),), 40),
            aftercnn_lens=torch.full((len(chunks),), 20),
        ).last_hidden_state
    got = AudioEncoder(tiny_model.encoder_tower, pad_to_buckets=False).encode(chunks)
    torch.testing.assert_close(got.flatten(0, 1), expected)


def test_a_tower_of_another_layout_is_refused_at_construction_naming_the_part(tiny_model):
    """The encoder reads the tower's parts once, typed; a wrong module fails there, not inside the first forward."""
    import pytest

    with pytest.raises(TypeError, match=r"Linear\.layers is missing"):
        AudioEncoder(torch.nn.Linear(4, 4))
    tower = tiny_model.encoder_tower
    original = tower.layers[0].fc1
    tower.layers[0].fc1 = torch.nn.Identity()
    try:
        with pytest.raises(TypeError, match=r"Qwen2_5OmniAudioEncoderLayer\.fc1 is a Identity, expected a Linear"):
            AudioEncoder(tower)
    finally:
        tower.layers[0].fc1 = original
