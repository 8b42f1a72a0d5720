"""Where a checkpoint comes from: a local directory, or a Hugging Face Hub repo id.

``resolve_checkpoint_source(value)`` turns ``engine.checkpoint`` / ``--checkpoint`` into a
directory in the release layout (checkpoint.py reads it):

* an existing directory is used as it is;
* ``owner/name`` or ``owner/name@revision`` (a branch, tag or commit) is fetched with
  ``huggingface_hub.snapshot_download`` into the Hugging Face cache, release files only,
  or found there without any request when ``HF_HUB_OFFLINE=1``.

huggingface_hub reads ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``,
``HF_ENDPOINT`` and its timeouts when it is first imported, so the process's environment
at start-up decides; nothing here reads the environment itself. Every failure is one
``CheckpointError`` that says what was tried, what went wrong and how to fix it.

A download reports its bytes to ``progress`` (model/progress.py): log lines with the rate and the
time left, and ``/ready``'s answer while the server starts.

Only ``owner/name`` counts as a repo id (not a bare ``name``), so a mistyped relative
directory such as ``checkpoints`` is reported as missing instead of being looked up online.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from audio_interaction_server.model.layout import (
    ENCODER_FILES,
    INDEX_FILE,
    MODEL_CONFIG_FILE,
    OMNI_CONFIG_DIR,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    resolve_files,
)
from audio_interaction_server.model.progress import LoadProgress

log = logging.getLogger(__name__)

# The files the loader opens (either encoder name), so a repo's README assets, training
# state or other formats are never downloaded. generation_config.json is small and the
# reference reads it.
RELEASE_FILE_PATTERNS = (
    MODEL_CONFIG_FILE,
    INDEX_FILE,
    "*.safetensors",
    *ENCODER_FILES,
    f"{OMNI_CONFIG_DIR}/*",
    TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    "generation_config.json",
)

_REPO_ID_SHAPE = re.compile(r"(?P<repo_id>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^\s@]+))?")


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None  # None = the repo's default branch

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse_repo_id(value: str) -> HubSource | None:
    """``owner/name`` or ``owner/name@revision`` as the Hub accepts it, else None."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    match = _REPO_ID_SHAPE.fullmatch(value)
    if match is None:
        return None
    try:
        validate_repo_id(match["repo_id"])  # the Hub's own rules: no "--" or "..", at most 96 characters
    except HFValidationError:
        return None
    return HubSource(match["repo_id"], match["revision"])


def checkpoint_source_problem(value: str | Path) -> str | None:
    """Why ``value`` names neither a directory nor a Hugging Face repo id, in one line (None: it may name one);
    without the network. What the configuration, ``run``'s flag and the loader say of such a value."""
    text = str(value)
    path = Path(text).expanduser()
    if path.is_dir():
        return None
    if path.exists():  # a file of a checkpoint (its index, its config), named for its folder: never a repo id
        return (f"checkpoint {text!r} is a file, not a checkpoint directory: pass the directory that holds it"
                f"{f' ({str(path.parent)!r})' if (path.parent / 'model_config.yaml').is_file() else ''}, in the "
                "release layout, or a Hugging Face repo id such as zhifeixie/AudioInteraction")
    if parse_repo_id(text) is None:
        relative = "" if path.is_absolute() else f" (a relative path is read from the current directory, {Path.cwd()})"
        return (f"checkpoint {text!r} is not an existing directory and not a Hugging Face repo id ('owner/name' or "
                f"'owner/name@revision'){relative}; pass a checkpoint directory in the release layout or a repo id "
                "such as zhifeixie/AudioInteraction")
    return None


def resolve_checkpoint_source(value: str | Path, cache_dir: Path | None = None,
                              progress: LoadProgress | None = None) -> Path:
    """A directory in the release layout for ``value``; ``cache_dir`` overrides the HF cache; a download
    reports to ``progress``."""
    problem = checkpoint_source_problem(value)
    if problem is not None:
        raise CheckpointError(problem)
    path = Path(str(value)).expanduser()
    if path.is_dir():
        return path
    source = parse_repo_id(str(value))
    assert source is not None  # checkpoint_source_problem said so
    return _fetch(source, cache_dir, progress or LoadProgress())


def _fetch(source: HubSource, cache_dir: Path | None, progress: LoadProgress) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    is_offline = bool(constants.HF_HUB_OFFLINE)
    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    because = f"(read as a Hugging Face repo id: no directory {str(source)!r} exists in {Path.cwd()})"
    fix = _how_to_fix(source, cache)
    if is_offline:
        log.info("looking up %s in the Hugging Face cache %s (HF_HUB_OFFLINE is set)", source, cache)
    else:
        log.info("fetching %s from %s into %s (release files only; the first download is large)",
                 source, constants.ENDPOINT, cache)
    try:
        if not is_offline:
            progress.begin("downloading", "bytes", what=str(source))
        snapshot = snapshot_download(
            source.repo_id,
            revision=source.revision,
            cache_dir=cache_dir,
            allow_patterns=list(RELEASE_FILE_PATTERNS),
            local_files_only=is_offline,
            library_name="audio-interaction-server",
            tqdm_class=_progress_bars(progress),
        )
        progress.finish()
    except GatedRepoError as error:
        raise CheckpointError(
            f"{source} is a gated repo on the Hugging Face Hub: accept its terms on the model page and set "
            f"HF_TOKEN to a token of that account. {because} {fix}"
        ) from error
    except RepositoryNotFoundError as error:
        raise CheckpointError(
            f"the Hugging Face Hub has no repo {source.repo_id!r} that this token can read (missing, private, "
            f"or HF_TOKEN unset/wrong); the model card repo is zhifeixie/AudioInteraction. {because}"
        ) from error
    except RevisionNotFoundError as error:
        raise CheckpointError(
            f"the Hugging Face repo {source.repo_id!r} has no revision {source.revision!r} "
            f"(a branch, tag or commit hash). {because}"
        ) from error
    except LocalEntryNotFoundError as error:  # nothing usable in the cache, and the Hub not asked or not reached
        if type(error).__name__ == "IncompleteSnapshotError":
            problem = f"the cached snapshot of {source} in {cache} is incomplete ({error})"
        elif is_offline:
            problem = (f"HF_HUB_OFFLINE is set, so nothing is downloaded, and the cache {cache} holds no "
                       f"snapshot of {source}")
        else:
            cause = error.__cause__ or error
            problem = (f"the Hugging Face Hub ({constants.ENDPOINT}) could not be reached to download {source} "
                       f"({type(cause).__name__}: {_first_line(cause)}), and the cache {cache} holds no snapshot "
                       "of it")
        raise CheckpointError(f"{problem} {because}. {fix}") from error
    except HfHubHTTPError as error:
        raise CheckpointError(f"the Hugging Face Hub failed while downloading {source}: {_first_line(error)}. "
                              f"{fix}") from error
    except OSError as error:  # the cache is not writable, or the disk is full
        raise CheckpointError(f"downloading {source} into the Hugging Face cache {cache} failed: {error}. "
                              "Point HF_HOME at a writable directory with room for the checkpoint "
                              "(about 15 GB for the release).") from error
    except Exception as error:  # a proxy or TLS failure surfaces as the HTTP client's own type
        raise CheckpointError(f"downloading {source} from the Hugging Face Hub failed: "
                              f"{type(error).__name__}: {_first_line(error)}. {fix}") from error
    root = Path(snapshot)
    try:
        resolve_files(root)
    except CheckpointError as error:
        hint = " (the cached snapshot may be partial: run once without HF_HUB_OFFLINE)" if is_offline else ""
        raise CheckpointError(f"{source} resolved to {root}, which is not in the release layout{hint}: "
                              f"{error}") from None
    log.info("checkpoint %s is %s", source, root)
    return root


def _progress_bars(progress: LoadProgress) -> type:
    """A tqdm class for ``snapshot_download``: its bars are never drawn (a bar redrawn on stderr would
    garble a log file and break ``--log-format json``); the bar of bytes written to the cache reports
    to ``progress`` instead. huggingface_hub also keeps a bar of bytes received from the network
    ("Downloading bytes"), which deduplication and compression make no fraction of the files' size,
    and one of files done: neither is counted."""
    from tqdm import tqdm  # huggingface_hub's own dependency

    class CacheBytesToProgress(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            self._counts_bytes = False  # set first: tqdm's __init__ assigns total, seen by __setattr__
            counts_bytes = kwargs.get("unit") == "B" and not str(kwargs.get("desc", "")).startswith("Downloading")
            super().__init__(*args, **{**kwargs, "disable": True})
            self._counts_bytes = counts_bytes
            if counts_bytes and self.total:
                progress.set_total(self.total)

        def __setattr__(self, name: str, value) -> None:
            # snapshot_download grows the total as each file's download starts (bar.total = bar.total + size).
            if name == "total" and getattr(self, "_counts_bytes", False) and value:
                progress.set_total(value)
            super().__setattr__(name, value)

        def update(self, n: float | None = 1) -> bool | None:
            if self._counts_bytes and n:
                progress.advance(n)
            return super().update(n)

    return CacheBytesToProgress


def _how_to_fix(source: HubSource, cache: Path) -> str:
    revision = f" --revision {source.revision}" if source.revision else ""
    return (
        f"To fix: on a machine that can reach the Hub run `hf download {source.repo_id}{revision} --local-dir DIR` "
        "and pass DIR as the checkpoint (engine.checkpoint, AIS_ENGINE__CHECKPOINT or --checkpoint); or fill a "
        f"Hugging Face cache there ({cache} here), bring it to this machine, point HF_HOME at it "
        "and set HF_HUB_OFFLINE=1."
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
