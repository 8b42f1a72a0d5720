"""Scripted turns: a benchmark-only override that makes a random-weight model talk on a schedule.

Random weights decide almost at random and ramble or stop at once, so the
speaking load of a capacity run would be an accident. With a script, every
session starts a reply every ``every_chunks`` chunks (staggered by slot) and
each reply is exactly ``reply_tokens`` tokens (ended by the session's turn cap
like any reply if that is lower). The model still computes every
row's logits exactly as in serving; only the committed token is replaced.
Runs that use it must say so (the server logs a warning at start-up).
"""

from __future__ import annotations

from audio_interaction_server import spec as T
from audio_interaction_server.config import ScriptedTurns
from audio_interaction_server.engine.conversation import Conversation, Phase

# A plain text token stands in for a control token the random model picks mid-reply.
_FILLER_TOKEN = 1350  # an ordinary BPE token of the Qwen vocabulary


def scripted_token(script: ScriptedTurns, conversation: Conversation, slot: int, model_token: int) -> int:
    """The token to commit instead of ``model_token`` for the row just planned on ``conversation``."""
    if conversation.phase is Phase.LISTENING:
        speak = (conversation.num_chunks_consumed + slot) % script.every_chunks == script.every_chunks - 1
        return T.TEXT_BEGIN if speak else T.KEEP_SILENCE
    if conversation.turn_length + 1 > script.reply_tokens:
        return T.TEXT_END
    return _FILLER_TOKEN if T.is_control_token(model_token) else model_token
