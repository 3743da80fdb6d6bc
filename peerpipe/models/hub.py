"""Models by Hugging Face id (``Qwen/Qwen3-0.6B``, ``org/name@revision``), through
``huggingface_hub``: its cache (``$HF_HUB_CACHE``, ``$HF_HOME``), ``$HF_TOKEN`` and
``$HF_HUB_OFFLINE`` are honoured; only the files a stage can load are fetched (safetensors,
configs, tokenizer, chat template), never PyTorch pickles or GGUF variants."""

from __future__ import annotations

import os
import re
from pathlib import Path

from peerpipe.models.errors import ModelNotFoundError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_./-]+)?")
WANTED = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
          "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json"]


def looks_like_hub_id(text: str) -> bool:
    return HUB_ID.fullmatch(text) is not None and ".." not in text


def resolve_hub(text: str) -> Path:
    """The local snapshot folder of a Hub model, fetched (with progress) when not cached."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ModelNotFoundError(f"{text!r} looks like a Hugging Face id, which needs huggingface_hub: pip install huggingface_hub") from None
    repo, _, revision = text.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        path = huggingface_hub.snapshot_download(
            repo,
            revision=revision or None,
            allow_patterns=WANTED,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,  # read now, not when huggingface_hub was imported
            local_files_only=offline,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except errors.GatedRepoError:
        raise ModelNotFoundError(f"{repo} is gated on the Hub: accept its licence there and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"no folder {text!r} here, and no model {repo!r} on the Hugging Face Hub (or it is private: set HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise ModelNotFoundError(f"{repo} has no revision {revision!r}") from None
    except (errors.LocalEntryNotFoundError, FileNotFoundError):
        what = f"{repo} is not in the Hugging Face cache"
        if revision and _cached(repo):
            what = f"{repo} is in the Hugging Face cache, but not its revision {revision!r}"
        raise ModelNotFoundError(
            f"no folder {text!r} here, and {what} while the Hub cannot be reached"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
        ) from None
    except (errors.HfHubHTTPError, OSError) as exc:
        raise ModelNotFoundError(f"cannot fetch {repo} from the Hugging Face Hub: {exc}") from None
    folder = Path(path)
    if not any(folder.glob("*.safetensors")):
        raise ModelNotFoundError(f"{repo} has no safetensors weights on the Hub; peerpipe loads safetensors (or a GGUF file)")
    return folder


def _cached(repo: str) -> bool:
    """Whether the Hub cache holds any revision of ``repo``."""
    from huggingface_hub import constants

    root = Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    return any((root / f"models--{repo.replace('/', '--')}" / "snapshots").glob("*"))

