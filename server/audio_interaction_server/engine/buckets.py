"""The fixed shapes a static step runs at: (listening rows, reply rows) buckets, and how a batch is cut into them.

A static step (``model/static_step.py``) has every shape fixed, so a batch of rows is padded up to
a bucket: ``listening`` rows of up to ``ROW_TOKENS`` tokens each (a 13-token block with its audio
chunk) and ``reply`` rows of one token. A CUDA graph is captured per bucket, so the set is small:
two sizes per doubling for listening rows (8, 16, 24, 32, 48, 64, ...) and, since only about one
stream in ten is mid-reply at a time, a shorter list for reply rows. A batch that does not fit the
largest bucket is cut into several steps, each of which fits.

Pure Python over ``model.static_step.Bucket``: unit-tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from audio_interaction_server.model.static_step import ROW_TOKENS, Bucket

__all__ = ["ROW_TOKENS", "Bucket", "BucketSet", "listening_sizes", "max_reply_rows", "reply_sizes"]

# Reply-row bucket sizes before doubling takes over (gpu-step.md: replies are a minority of rows).
_REPLY_SIZES = (0, 8, 16, 32, 64, 96)

# Reply rows per step that the buckets cover at least (gpu-step.md: about one stream in ten is mid-reply);
# more in one batch run as a second step.
MIN_REPLY_BUCKET_ROWS = 96


def max_reply_rows(max_rows: int) -> int:
    """The reply rows the largest bucket is built for, with ``max_rows`` rows per step."""
    return max(1, min(max_rows, max(MIN_REPLY_BUCKET_ROWS, max_rows // 4)))


def listening_sizes(max_rows: int) -> tuple[int, ...]:
    """0, 8, 16, 24, 32, 48, 64, 96, 128, ... (2^k and 3 x 2^(k-1)), up to the first size >= ``max_rows``."""
    sizes = [0, 8, 16]
    while sizes[-1] < max_rows:
        last = sizes[-1]
        is_power_of_two = last & (last - 1) == 0
        sizes.append(last * 3 // 2 if is_power_of_two else last // 3 * 4)
    return _up_to(sizes, max_rows)


def reply_sizes(max_rows: int) -> tuple[int, ...]:
    """0, 8, 16, 32, 64, 96, then doubling, up to the first size >= ``max_rows``."""
    sizes = [0]
    while sizes[-1] < max_rows:
        bigger = [size for size in _REPLY_SIZES if size > sizes[-1]]
        sizes.append(bigger[0] if bigger else 2 * sizes[-1])
    return tuple(sizes)


def _up_to(sizes: list[int], max_rows: int) -> tuple[int, ...]:
    """``sizes`` (ascending) cut after the first one that holds ``max_rows``."""
    end = next(i for i, size in enumerate(sizes) if size >= max_rows)
    return tuple(sizes[: end + 1])


@dataclass(frozen=True)
class BucketSet:
    """Every (listening, reply) pair of ``listening_sizes`` x ``reply_sizes``, except the empty one."""

    listening: tuple[int, ...]
    reply: tuple[int, ...]

    @staticmethod
    def for_rows(max_listening_rows: int, max_reply_rows: int) -> BucketSet:
        if max_listening_rows < 1 or max_reply_rows < 0:
            raise ValueError(f"bucket bounds must be >= 1 listening and >= 0 reply rows, got "
                             f"{max_listening_rows}, {max_reply_rows}")
        return BucketSet(listening_sizes(max_listening_rows), reply_sizes(max_reply_rows))

    @property
    def largest(self) -> Bucket:
        return Bucket(self.listening[-1], self.reply[-1])

    def all(self) -> list[Bucket]:
        """Every bucket, largest first (the order graphs are captured in, so later ones reuse the pool)."""
        buckets = [Bucket(lo, re) for lo in self.listening for re in self.reply if lo or re]
        return sorted(buckets, key=lambda b: (b.num_tokens, b.num_rows), reverse=True)

    def smallest_fit(self, listening: int, reply: int) -> Bucket | None:
        """The bucket with the fewest tokens (then rows) that holds the rows; None if none does."""
        lo = next((size for size in self.listening if size >= listening), None)
        re = next((size for size in self.reply if size >= reply), None)
        if lo is None or re is None or (lo == 0 and re == 0):
            return None
        return Bucket(lo, re)

    def split(self, listening: int, reply: int) -> list[tuple[Bucket, int, int]]:
        """Cut ``listening`` + ``reply`` rows into steps: [(bucket, listening rows, reply rows)], in row order.

        Each step takes as many of the remaining rows of each kind as the largest bucket holds, and
        runs at the smallest bucket that fits what it took. Empty input gives no step.
        """
        steps = []
        largest = self.largest
        while listening > 0 or reply > 0:
            take_listening, take_reply = min(listening, largest.listening), min(reply, largest.reply)
            if take_listening == 0 and take_reply == 0:
                raise ValueError(f"no bucket holds {listening} listening and {reply} reply rows "
                                 f"(listening sizes {self.listening}, reply sizes {self.reply})")
            bucket = self.smallest_fit(take_listening, take_reply)
            assert bucket is not None  # both counts are within the largest sizes, and not both zero
            steps.append((bucket, take_listening, take_reply))
            listening, reply = listening - take_listening, reply - take_reply
        return steps
