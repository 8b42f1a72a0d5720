"""Builds the real Qwen tokenizer (tokenizer.json + tokenizer_config.json) for tests and demos.

The release ships its own tokenizer.json, but tests and demos without a
checkpoint still want the true 151643-rank vocabulary: the protocol's control
ids are ordinary Qwen tokens and the system prompt length (41 tokens) is part
of the prompt layout. The ranks come from ``dashscope/resources/qwen.tiktoken``
(``base64(token_bytes) rank`` per line), read from an installed ``dashscope`` or
from its wheel fetched with ``pip download --no-deps`` (dashscope's own
dependencies are never installed). Nothing here is committed: results are
cached under ``$AUDIO_INTERACTION_CACHE`` or ``~/.cache/audio-interaction/``
(``qwen.tiktoken``, ``qwen_tokenizer.json``; delete them to force a rebuild).

Usage: ``python -m audio_interaction_server.demo.qwen_vocab OUT_DIR``.
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import importlib.resources
import json
import logging
import os
import re
import socket
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from audio_interaction_server.render.detokenizer import byte_level_chars

log = logging.getLogger(__name__)

DASHSCOPE_VERSION = "2.0.2"
TIKTOKEN_MEMBER = "dashscope/resources/qwen.tiktoken"
TIKTOKEN_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
NUM_RANKS = 151643

PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2.5-Omni's 22 added tokens from id 151643 (151665 ids in all), in id
# order, with their "special" flag. 151643-151648 are fixed by the protocol
# (tokens.py); 151652/151653 (vision bos/eos), 151655 (IMAGE) and 151656
# (VIDEO) match transformers' Qwen2.5-Omni config defaults; the rest keep
# Qwen2.5's slots (Omni reuses 151646-151648 and renames the vision tokens).
# The tool-call tags are added but not special, as in Qwen2.5.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|AUDIO|>", True),
    ("<|audio_bos|>", True),
    ("<|audio_eos|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_bos|>", True),
    ("<|vision_eos|>", True),
    ("<|vision_pad|>", True),
    ("<|IMAGE|>", True),
    ("<|VIDEO|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
)

_TOKENIZER_CACHE_NAME = "qwen_tokenizer.json"
_TIKTOKEN_CACHE_NAME = "qwen.tiktoken"


class VocabUnavailable(RuntimeError):
    """The Qwen ranks could not be obtained (typically: no network and no cache)."""


def cache_dir() -> Path:
    configured = os.environ.get("AUDIO_INTERACTION_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "audio-interaction"


def qwen_tiktoken_path() -> Path:
    """Path of the cached ``qwen.tiktoken``, fetching it on first use."""
    cached = cache_dir() / _TIKTOKEN_CACHE_NAME
    if not cached.is_file():
        data = _read_installed_dashscope()
        if data is None or not _is_expected(data):
            # Other dashscope versions may ship other ranks; the pinned wheel is the reference.
            log.info("fetching the Qwen vocabulary: pip download dashscope==%s (once; cached in %s)",
                     DASHSCOPE_VERSION, cached.parent)
            try:
                data = _download_from_wheel()
            except VocabUnavailable as error:
                raise VocabUnavailable(
                    f"{error}. Without a package index: copy qwen.tiktoken (in the dashscope=={DASHSCOPE_VERSION} "
                    f"wheel, or another machine's cache) to {cached}, or set AUDIO_INTERACTION_CACHE to a folder "
                    "that holds it; or serve a checkpoint (--checkpoint DIR, which carries its own tokenizer: "
                    "make-checkpoint writes one on a machine with the index)") from None
            if not _is_expected(data):
                raise VocabUnavailable(f"dashscope=={DASHSCOPE_VERSION} qwen.tiktoken fails its sha256 check")
        _write_atomic(cached, data)
    return cached


def load_ranks(path: Path) -> dict[bytes, int]:
    """Token bytes → rank; checks that ranks are exactly 0..NUM_RANKS-1."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    if sorted(ranks.values()) != list(range(NUM_RANKS)):
        raise ValueError(f"{path}: expected ranks 0..{NUM_RANKS - 1}, got {len(ranks)} tokens")
    return ranks


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token, ordered by the merged token's rank.

    tiktoken merges, among adjacent parts, the pair whose concatenation has the
    lowest rank; HF BPE merges the listed pair with the lowest index. A part's
    internal merge history never depends on its neighbours (a merge across its
    boundary would have destroyed it), so whenever tiktoken forms token T it
    forms it from the two parts that tiktoken's own algorithm on T's bytes
    ends with. Listing exactly that pair for every T, in rank order, makes HF's
    candidate pairs a subset of tiktoken's that always holds tiktoken's pick,
    ordered the same way, so both pick the same pair at every step. A T whose own bytes do
    not merge back into T is only reachable through tiktoken's whole-piece
    lookup, which ``ignore_merges=True`` reproduces; it needs no merge.
    """
    merges: list[tuple[int, bytes, bytes]] = []
    for token, rank in ranks.items():
        if len(token) > 1:
            last_pair = _last_merge(token, ranks)
            if last_pair is not None:
                merges.append((rank, *last_pair))
    merges.sort()
    return [(left, right) for _, left, right in merges]


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """Runs tiktoken's BPE on ``token`` alone; returns its final pair if it ends as ``token``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_index, best_rank = -1, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_index, best_rank = i, rank  # strict <: leftmost wins ties, as in tiktoken
        if best_rank is None:
            return None
        if len(parts) == 2:
            return parts[0], parts[1]
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return None


def tokenizer_from_ranks(
    ranks: dict[bytes, int], added_tokens: tuple[tuple[str, bool], ...] = ADDED_TOKENS
) -> Tokenizer:
    """A HF byte-level BPE tokenizer that tokenizes like tiktoken with ``ranks`` and the Qwen pattern.

    ``ranks`` must hold every single byte and be numbered 0..len-1; added tokens
    get ids from ``len(ranks)`` in the given order.
    """
    alphabet = byte_level_chars()

    def as_chars(data: bytes) -> str:
        return "".join(alphabet[b] for b in data)

    vocab = {as_chars(token): rank for token, rank in ranks.items()}
    merges = [(as_chars(left), as_chars(right)) for left, right in derive_merges(ranks)]
    # ignore_merges: a pre-token that is itself in the vocabulary maps to that one id,
    # as tiktoken's encoder does before running BPE.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    for content, is_special in added_tokens:
        # One at a time: ids are assigned in call order, and order is the contract.
        token = AddedToken(content, special=is_special, normalized=False)
        if is_special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    for offset, (content, _) in enumerate(added_tokens):
        if tokenizer.token_to_id(content) != len(ranks) + offset:
            raise AssertionError(f"{content} did not get id {len(ranks) + offset}")
    return tokenizer


def build_qwen_tokenizer_json(out_path: Path) -> Path:
    """Converts the cached Qwen ranks into ``out_path`` (a HF tokenizer.json)."""
    tokenizer = tokenizer_from_ranks(load_ranks(qwen_tiktoken_path()))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_path))
    return out_path


def tokenizer_config() -> dict[str, object]:
    """tokenizer_config.json contents; the reference loader reads ``tokenizer_class`` unconditionally."""
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 32768,
        "split_special_tokens": False,
        "added_tokens_decoder": {
            str(NUM_RANKS + offset): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": is_special,
            }
            for offset, (content, is_special) in enumerate(ADDED_TOKENS)
        },
    }


def write_tokenizer_files(out_dir: Path) -> None:
    """Writes tokenizer.json and tokenizer_config.json into ``out_dir`` (converted once, then cached)."""
    cached = cache_dir() / _TOKENIZER_CACHE_NAME
    if not cached.is_file():
        with tempfile.TemporaryDirectory(dir=_ensure_cache_dir(), prefix=_scratch_prefix()) as scratch:
            built = build_qwen_tokenizer_json(Path(scratch) / _TOKENIZER_CACHE_NAME)
            os.replace(built, cached)  # atomic: concurrent builders never see half a file
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out_dir / "tokenizer.json")
    config_text = json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(config_text, encoding="utf-8")


def _ensure_cache_dir() -> Path:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(directory)
    return directory


# Scratch files and folders in the cache carry their host's name and their process's id: a start stopped while it
# fetched or built (Ctrl-C ends a starting server at once, without unwinding) leaves them, and a later start on
# the same host removes those whose process has ended. Another host's (a cache shared over NFS, or by containers,
# each its own host name and process ids) are never touched: their processes cannot be looked at from here.
SCRATCH_PREFIX = "ais-scratch-"


def _scratch_prefix() -> str:
    return f"{SCRATCH_PREFIX}{_host_label()}-{os.getpid()}-"


def _host_label() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _remove_stale_scratch(directory: Path) -> None:
    ours = f"{SCRATCH_PREFIX}{_host_label()}-"
    for scratch in directory.glob(f"{glob.escape(ours)}*"):
        pid = scratch.name.removeprefix(ours).partition("-")[0]
        if pid.isdigit() and not process_exists(int(pid)):
            if scratch.is_dir():
                shutil.rmtree(scratch, ignore_errors=True)
            else:
                scratch.unlink(missing_ok=True)


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` is alive on this host (another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    _ensure_cache_dir()
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=_scratch_prefix(), delete=False) as handle:
        handle.write(data)
    os.chmod(handle.name, 0o644)  # NamedTemporaryFile creates 0600; the cache may be shared
    os.replace(handle.name, path)


def _is_expected(data: bytes) -> bool:
    return hashlib.sha256(data).hexdigest() == TIKTOKEN_SHA256


def _read_installed_dashscope() -> bytes | None:
    try:
        return importlib.resources.files("dashscope").joinpath("resources/qwen.tiktoken").read_bytes()
    except (ImportError, OSError):  # not installed, or installed without its dependencies
        return None


def _download_from_wheel() -> bytes:
    with tempfile.TemporaryDirectory() as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", "--retries", "1", "--timeout", "20",
            "-d", scratch, f"dashscope=={DASHSCOPE_VERSION}",
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise VocabUnavailable(f"pip download of dashscope failed: {error}") from error
        wheels = list(Path(scratch).glob("dashscope-*.whl"))
        if result.returncode != 0 or not wheels:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise VocabUnavailable(f"pip download of dashscope=={DASHSCOPE_VERSION} failed: {last_line}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            return wheel.read(TIKTOKEN_MEMBER)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="where to write tokenizer.json and tokenizer_config.json")
    args = parser.parse_args(argv)
    try:
        write_tokenizer_files(args.out_dir)
    except VocabUnavailable as error:
        parser.exit(1, f"error: {error}\n")
    except OSError as error:  # a file of that name, no permission: one line, not a traceback
        why = "it is a file, not a folder" if args.out_dir.is_file() else (error.strerror or str(error))
        parser.exit(2, f"error: cannot write the tokenizer files into {args.out_dir}: {why}\n")
    print(f"wrote {args.out_dir / 'tokenizer.json'} and {args.out_dir / 'tokenizer_config.json'}")


if __name__ == "__main__":
    main()
