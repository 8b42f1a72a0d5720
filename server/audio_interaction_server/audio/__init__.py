"""The sans-I/O audio front-end: decode, resample, streaming log-mel, and the per-stream chain."""
