"""``/v1/realtime``: the OpenAI Realtime API's GA events, a second codec feeding the same session as ``/v1/stream``."""
