"""The no-weights demo model: a tiny random checkpoint in the release layout, and the Qwen vocabulary it uses."""
