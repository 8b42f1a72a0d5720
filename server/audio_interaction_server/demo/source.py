"""The one place that decides what model a process serves: the configured checkpoint, or the demo.

The server (``api/runtime.py``) and the offline runner (``cli.py run``) both ask here, so "no
checkpoint means the tiny random demo, and it says so loudly" holds everywhere the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audio_interaction_server.model.progress import LoadProgress

log = logging.getLogger(__name__)


# How the server is given a checkpoint; ``run`` has its flag alone (its caller says so).
SERVER_CHECKPOINT_SETTINGS = "--checkpoint, or engine.checkpoint / AIS_ENGINE__CHECKPOINT"


def resolve_model_source(checkpoint: str | Path | None, demo: bool = False,
                         progress: LoadProgress | None = None, given_by: str = SERVER_CHECKPOINT_SETTINGS) -> Path:
    """A local checkpoint directory to load: the demo's (written on first use, then cached) when ``demo`` is
    set or no checkpoint is given; else ``checkpoint`` itself, or the Hub repo it names, fetched. ``given_by``:
    how the caller's command takes a checkpoint, as the demo's warning tells it."""
    if demo or checkpoint is None:
        from audio_interaction_server.demo.make_tiny_checkpoint import ensure_demo_checkpoint

        log.warning("=" * 72)
        log.warning("DEMO MODE: the tiny RANDOM model; its replies are noise.")
        log.warning("Give a checkpoint (%s) for the real one.", given_by)
        log.warning("=" * 72)
        return ensure_demo_checkpoint()
    from audio_interaction_server.model.hub import resolve_checkpoint_source

    return resolve_checkpoint_source(checkpoint, progress=progress)  # a directory, or a Hub repo id to fetch
