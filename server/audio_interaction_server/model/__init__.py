"""Torch modules and weights: the LM with its KV cache, the audio encoder, checkpoint, Hub, fitting to the device."""
