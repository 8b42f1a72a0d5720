"""The release checkpoint's layout: which files a directory must hold, found and checked without reading a weight.

Apart from ``checkpoint.py`` (which builds the modules, with torch) so that what needs only the files (the model
hub's download, a front of an engine process loading the tokenizer) imports no torch. Layout::

    model_config.yaml                    LitGPT Config fields
    model.safetensors.index.json         {"weight_map": {param: shard}}
    model-0000k-of-0000N.safetensors     LitGPT-named LM weights
      (or, without an index, one model.safetensors holding them all: an unsharded checkpoint of one's own)
    audiointeraction_ChunkwisedEncoder.pth   (or MiniOmni3_ChunkwisedEncoder.pth)
    qwen25OmniConfig/config.json         Qwen2.5-Omni config; thinker_config.audio_config is used
    tokenizer.json                       HF tokenizers file (prompt encoding, reply decoding)
    tokenizer_config.json                optional, not read
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MODEL_CONFIG_FILE = "model_config.yaml"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"  # an unsharded LM, taken where there is no index
ENCODER_FILES = ("audiointeraction_ChunkwisedEncoder.pth", "MiniOmni3_ChunkwisedEncoder.pth")
OMNI_CONFIG_DIR = "qwen25OmniConfig"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that does not match the release layout."""


@dataclass(frozen=True)
class CheckpointFiles:
    root: Path
    model_config: Path
    index: Path  # the safetensors index; or, for an unsharded checkpoint, its one model.safetensors
    encoder_weights: Path
    omni_config_dir: Path
    tokenizer: Path
    tokenizer_config: Path | None

    @property
    def is_unsharded(self) -> bool:
        """The LM's weights are one model.safetensors (standing where the index would), not shards an index lists."""
        return self.index.name == SINGLE_WEIGHTS_FILE


def resolve_files(root: Path) -> CheckpointFiles:
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist")
    encoder = next((root / n for n in ENCODER_FILES if (root / n).is_file()), None)
    index = root / INDEX_FILE
    if not index.is_file() and (root / SINGLE_WEIGHTS_FILE).is_file():
        index = root / SINGLE_WEIGHTS_FILE  # unsharded: one file holds every LM tensor
    omni_dir = root / OMNI_CONFIG_DIR
    # Every missing file at once: fixing a download one error at a time wastes a reload per file.
    expected = [
        (MODEL_CONFIG_FILE, (root / MODEL_CONFIG_FILE).is_file(), "the LitGPT model config (YAML)"),
        (INDEX_FILE, index.is_file(), 'the safetensors index {"weight_map": {...}}, or one model.safetensors '
         "holding every LM tensor"),
        (" or ".join(ENCODER_FILES), encoder is not None, "the audio tower, a Qwen2_5OmniAudioEncoder state dict"),
        (OMNI_CONFIG_DIR if not omni_dir.is_dir() else f"{OMNI_CONFIG_DIR}/config.json",
         (omni_dir / "config.json").is_file(), "the Qwen2.5-Omni config with thinker_config.audio_config"),
        (TOKENIZER_FILE, (root / TOKENIZER_FILE).is_file(), "the HF tokenizers tokenizer.json"),
    ]
    missing = [f"{name} is missing ({what})" for name, is_there, what in expected if not is_there]
    shards = [SINGLE_WEIGHTS_FILE] if index.name == SINGLE_WEIGHTS_FILE else _listed_shards(index)
    missing += [f"{name} is missing (listed in {INDEX_FILE})" for name in shards if not (root / name).is_file()]
    if missing:
        nested = _nested_checkpoints(root) if not (root / MODEL_CONFIG_FILE).is_file() else []
        hint = (f"; {' and '.join(str(n) for n in nested)} {'holds' if len(nested) == 1 else 'hold'} the layout: pass "
                f"{'it' if len(nested) == 1 else 'one of them'} as the checkpoint") if nested else ""
        raise CheckpointError(f"{root} is not in the release layout: " + "; ".join(missing) + hint)
    assert encoder is not None
    # A clone without Git LFS leaves small pointer files where the weights should be, and a file saved from the
    # Hub's web page is HTML: both are named here, at once, before a weight is read (a real shard takes minutes).
    stand_ins = [f"{path.name} is {what}"
                 for path in (*(root / name for name in shards), encoder, root / TOKENIZER_FILE)
                 if (what := stand_in(path)) is not None]
    if stand_ins:
        raise CheckpointError(f"{root} holds stand-ins, not the files themselves: " + "; ".join(stand_ins)
                              + ". Fetch the real files: `git lfs install && git lfs pull` in a Git clone of the "
                              "repo, or `hf download OWNER/NAME --local-dir DIR` and pass DIR")
    # Optional and not read: replies are decoded, and the prompt encoded, with tokenizer.json alone
    # (the prompt layout brings its own control tokens, so the bos/eos it declares are never used).
    tokenizer_config = root / TOKENIZER_CONFIG_FILE
    return CheckpointFiles(
        root=root,
        model_config=root / MODEL_CONFIG_FILE,
        index=index,
        encoder_weights=encoder,
        omni_config_dir=omni_dir,
        tokenizer=root / TOKENIZER_FILE,
        tokenizer_config=tokenizer_config if tokenizer_config.is_file() else None,
    )


LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"


def stand_in(path: Path) -> str | None:
    """What ``path`` holds instead of the file it is named after, from its first bytes: a Git LFS pointer (a
    clone made without Git LFS) or an HTML page (a 'blob' page of the Hub saved as the file); None otherwise."""
    try:
        with path.open("rb") as file:
            head = file.read(512)
    except OSError:
        return None  # unreadable: the loader says why
    if head.startswith(LFS_POINTER_PREFIX):
        return f"a Git LFS pointer ({path.stat().st_size} bytes), the repo cloned without Git LFS"
    start = head.lstrip().lower()
    if start.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a web page saved under its name)"
    return None


def _nested_checkpoints(root: Path, limit: int = 3) -> list[Path]:
    """Folders one or two levels below ``root`` with a model_config.yaml: the folder above a download
    (``--local-dir models/AudioInteraction`` passed as ``models``), or a Hugging Face cache's
    ``models--owner--name`` whose files are in ``snapshots/<commit>/``."""
    found: list[Path] = []
    try:
        for config in sorted(root.glob(f"*/{MODEL_CONFIG_FILE}")) + sorted(root.glob(f"*/*/{MODEL_CONFIG_FILE}")):
            found.append(config.parent)
            if len(found) == limit:
                break
    except OSError:
        return []
    return found


def _listed_shards(index: Path) -> list[str]:
    """The shard files ``index`` names; none where it is missing or unreadable (read_lm_state_dict says why)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({name for name in weight_map.values() if isinstance(name, str)})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def load_tokenizer(files: CheckpointFiles):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(files.tokenizer))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed JSON
        problem = _tokenizer_problem(files.tokenizer, exc)
        raise CheckpointError(f"{files.tokenizer} is not a HF tokenizers file: {problem}") from exc


def _tokenizer_problem(path: Path, error: Exception) -> str:
    """Why ``tokenizers`` refused ``path``. For valid JSON of another kind (a tokenizer_config.json or a vocab.json
    saved under the name) its serde error reads as a syntax error at a place where the JSON is fine: say what the
    file holds instead."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nested past the limit
        return str(error)  # not JSON (or unreadable): the parser's own words say where
    if not isinstance(content, dict) or "model" not in content:
        held = (f"its keys: {', '.join(json.dumps(key) for key in list(content)[:5])}" if isinstance(content, dict)
                else f"a JSON {type(content).__name__}")
        return (f"it is JSON, but not a tokenizer: no \"model\" section ({held}); a tokenizer_config.json or "
                "vocab.json saved as tokenizer.json? Use the tokenizer.json of the model's release")
    return str(error)
