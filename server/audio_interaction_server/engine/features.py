"""The features the model hears, computed when it is about to hear them.

A live session pushes ``PaddedBlocks``: each chunk waits in the session's queue as the block its log-mel is computed
from (``QueuedBlock``), and between steps only the chunk at the head of each queue, the one the session's next row
hears, becomes features, every session's at once (``mel.log_mel_blocks``). Audio the model never hears costs no
STFT: chunks a clear drops, the backlog of a session that ends, a backlog catch-up pacing holds back. Computed at
push, a client that sent 56 s and left, or cleared and sent again, had the worker compute about a thousand seconds
of features a second that nobody heard, and its neighbours' decisions came seconds late.

The streaming normalisation's running maximum advances chunk by chunk in each session's order, as
``StreamingLogMel`` does, so every chunk heard gets the same features, bit for bit
(``tests/audio/test_batched_log_mel.py``); a chunk at index 0 of its front-end stream starts a fresh maximum.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from audio_interaction_server.audio.blocks import PaddedBlocks
from audio_interaction_server.audio.mel import log_mel_blocks, normalize_next_chunk
from audio_interaction_server.engine.scheduler import Failure, SessionState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QueuedBlock:
    """A chunk not heard yet, as its centre-padded block of 16 kHz samples (``PaddedBlocks``' row)."""

    samples: np.ndarray  # (6640,) float32
    stream_index: int  # the chunk's index in its front-end stream: 0 starts a fresh running maximum


def queued_blocks(blocks: PaddedBlocks) -> list[QueuedBlock]:
    """A push's chunks as they wait to be heard (views of its array, not copies)."""
    return [QueuedBlock(row, blocks.first_chunk_index + index) for index, row in enumerate(blocks.samples)]


class HeadFeatures:
    """Turns the head of each session's queue into features; keeps each session's running maximum. Worker thread.

    Only the sessions ``watch`` named since the last ``compute`` are looked at (audio came; a row of theirs ran, so
    a chunk may have left the head): the queues of the others did not change, and a scan of every session each
    step cost about 0.4 ms at 600 sessions."""

    def __init__(self) -> None:
        self._running_max: dict[str, float] = {}
        self._watched: dict[str, SessionState] = {}

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._running_max

    def watch(self, session: SessionState) -> None:
        """The head of ``session``'s queue may be a chunk whose features are not computed yet."""
        self._watched[session.session_id] = session

    def forget(self, session_id: str) -> None:
        self._running_max.pop(session_id, None)
        self._watched.pop(session_id, None)

    def compute(self) -> list[Failure]:
        """Features for the head chunk of every watched queue that has none yet, in one batched call; the sessions
        whose audio could not be computed (each fails alone)."""
        watched, self._watched = self._watched, {}
        due = [session for session in watched.values()
               if session.conversation.audio_queue and type(session.conversation.audio_queue[0]) is QueuedBlock]
        if not due:
            return []
        heads: list[QueuedBlock] = [session.conversation.audio_queue[0] for session in due]
        try:
            raw: list[torch.Tensor | Exception] = list(log_mel_blocks(torch.from_numpy(
                np.stack([head.samples for head in heads]).astype(np.float32, copy=False))))
        except Exception:  # bad blocks from one front: find whose, the others go on
            log.exception("batched log-mel of %d chunks failed; computing them one by one", len(heads))
            raw = [_log_mel_or_error(head) for head in heads]
        failures = []
        for session, head, head_raw in zip(due, heads, raw):
            if isinstance(head_raw, Exception):
                failures.append(Failure(session, head_raw, "the log-mel of its audio could not be computed"))
                continue
            session_id = session.session_id
            running_max = -math.inf if head.stream_index == 0 else self._running_max.get(session_id, -math.inf)
            features, self._running_max[session_id] = normalize_next_chunk(head_raw, running_max)
            session.conversation.audio_queue[0] = features
        return failures


def _log_mel_or_error(head: QueuedBlock) -> torch.Tensor | Exception:
    try:
        return log_mel_blocks(torch.from_numpy(np.array(head.samples, dtype=np.float32)[None]))[0]
    except Exception as error:
        return error
