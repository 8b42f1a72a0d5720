"""What crosses the engine process boundary (engine/wire.py), through real ZeroMQ sockets."""

from __future__ import annotations

import numpy as np
import pytest
import zmq

from audio_interaction_server.audio.blocks import PaddedBlocks
from audio_interaction_server.engine.commands import CancelReply, PushAudio, RequestReply
from audio_interaction_server.engine.wire import (
    AUDIO_BLOCKS, COMMAND_BATCH, OpenRemote, decode, decode_batch, encode, encode_batch, recv_frames, send_frames,
)
from audio_interaction_server.options import SessionOptions


@pytest.fixture
def pair():
    context = zmq.Context()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    sender.bind("inproc://wire-test")
    receiver.connect("inproc://wire-test")
    yield sender, receiver
    sender.close(linger=0)
    receiver.close(linger=0)
    context.term()


def across(pair, message):
    sender, receiver = pair
    send_frames(sender, encode(message))
    return decode(recv_frames(receiver))


def test_a_live_streams_blocks_cross_as_raw_frames_and_arrive_equal(pair):
    """The most frequent command is written out by hand (no pickle): same session, index and samples, bit for bit."""
    rng = np.random.default_rng(0)
    for num_chunks, first_chunk_index in ((1, 0), (3, 17), (2, 2**40)):
        samples = rng.standard_normal((num_chunks, 6640)).astype(np.float32)
        sent = PushAudio("s-é-1", PaddedBlocks(samples, first_chunk_index))
        frames = encode(sent)
        assert len(frames) == 2 and frames[0].startswith(AUDIO_BLOCKS)
        received = across(pair, sent)
        assert type(received) is PushAudio and type(received.mel_chunks) is PaddedBlocks
        assert received.session_id == sent.session_id
        assert received.mel_chunks.first_chunk_index == first_chunk_index
        assert received.mel_chunks.samples.dtype == np.float32
        assert np.array_equal(received.mel_chunks.samples, samples)


def test_other_commands_and_features_still_cross_as_pickles(pair):
    features = np.arange(2 * 128 * 40, dtype=np.float32).reshape(2, 128, 40)
    received = across(pair, PushAudio("s1", features))
    assert np.array_equal(received.mel_chunks, features)
    assert across(pair, CancelReply("s1")) == CancelReply("s1")
    # A non-contiguous block array is sent as its contiguous copy.
    strided = np.arange(4 * 6640, dtype=np.float32).reshape(4, 6640)[::2]
    assert np.array_equal(across(pair, PushAudio("s2", PaddedBlocks(strided, 0))).mel_chunks.samples, strided)


def test_one_loop_turns_commands_cross_as_one_message_and_arrive_in_order(pair):
    """``encode_batch``: hand-written blocks, pickles with out-of-band arrays and plain pickles, mixed in one
    message, come out as they went in, in order; a lone command is sent exactly as ``encode`` writes it."""
    rng = np.random.default_rng(1)
    blocks = [rng.standard_normal((n, 6640)).astype(np.float32) for n in (1, 2)]
    features = np.arange(128 * 40, dtype=np.float32).reshape(1, 128, 40)
    sent = [OpenRemote("a", SessionOptions(max_turn_tokens=7)), PushAudio("a", PaddedBlocks(blocks[0], 0)),
            RequestReply("a"), PushAudio("b", features), PushAudio("b", PaddedBlocks(blocks[1], 5)), CancelReply("b")]
    frames = encode_batch(sent)
    assert frames[0] == COMMAND_BATCH
    sender, receiver = pair
    send_frames(sender, frames)
    received = decode_batch(recv_frames(receiver))
    assert [type(message) for message in received] == [type(message) for message in sent]
    assert received[0] == sent[0] and received[2] == sent[2] and received[5] == sent[5]
    assert [m.session_id for m in received] == ["a", "a", "a", "b", "b", "b"]
    assert np.array_equal(received[1].mel_chunks.samples, blocks[0]) and received[1].mel_chunks.first_chunk_index == 0
    assert np.array_equal(received[3].mel_chunks, features)
    assert np.array_equal(received[4].mel_chunks.samples, blocks[1]) and received[4].mel_chunks.first_chunk_index == 5

    lone = PushAudio("c", PaddedBlocks(blocks[0], 3))
    assert [bytes(frame) for frame in encode_batch([lone])] == [bytes(frame) for frame in encode(lone)]
    sender.send_multipart(encode(lone), copy=False)
    (received_lone,) = decode_batch(receiver.recv_multipart(copy=False))
    assert received_lone.session_id == "c" and np.array_equal(received_lone.mel_chunks.samples, blocks[0])
