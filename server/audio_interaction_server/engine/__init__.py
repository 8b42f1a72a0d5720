"""The worker thread's world, in token ids: conversation state machine, sampling, scripted turns, prompt, events."""
