"""Fetching files of the OpenAI GPT-2 checkpoints through the Hugging Face hub cache.

Everything here must fail fast and helpfully offline: the hub client retries a missing network for
about 20 s, so reachability is checked first with a short timeout.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

HUB_REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_download(name: str, filename: str) -> Path:
    """One file of a known model (`gpt2`, ...), from the local hub cache if it is there, else downloaded."""
    from huggingface_hub import hf_hub_download

    repo = HUB_REPOS[name]
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, local_files_only=True))
    except Exception:  # not cached yet
        pass
    reason = "the hub is not reachable (offline, or HF_HUB_OFFLINE is set)"
    if hub_reachable():
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename))
        except Exception as error:  # missing file, HTTP error: the user's way out is the same
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no details'}"
    raise OSError(
        f"could not fetch {filename} of {name} from the Hugging Face hub: {reason}. Pass a local directory "
        f"instead: for the model, a folder holding config.json and model.safetensors (or pytorch_model.bin), "
        f"e.g. made with `huggingface-cli download {repo} --local-dir DIR` on a machine with internet; for "
        f"the tokenizer, a folder holding vocab.json and merges.txt (such as ../shared/gpt2-tokenizer)."
    )
