"""models.hub: a hub name without a network fails fast (the local cache only, no retries) with a message that
says how to use a local directory instead, for the model and for the tokenizer."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from models.tokenizer import GPT2Tokenizer


@pytest.mark.slow  # a fresh interpreter that imports torch
def test_hub_name_offline_says_how_to_use_a_local_directory(tmp_path):
    """A real offline attempt (HF_HUB_OFFLINE=1, empty cache) in a fresh interpreter: quick, and helpful."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    code = "from models.gpt2 import GPT2Model\nGPT2Model.from_pretrained('gpt2')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])  # the repository, whatever pytest's directory
    assert result.returncode != 0
    assert "OSError: could not fetch config.json of gpt2" in result.stderr
    assert "local directory" in result.stderr and "model.safetensors" in result.stderr


def test_hub_name_offline_fails_fast_with_local_hint(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub

    real_download, calls = huggingface_hub.hf_hub_download, []

    def download(*args, **kwargs):  # records whether anything but a local-cache look-up is attempted
        calls.append(kwargs.get("local_files_only", False))
        return real_download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(OSError) as error:
        GPT2Tokenizer.from_pretrained("gpt2")
    # Only the cache was consulted: the hub client alone would retry for ~20 s without a network.
    assert calls and all(calls)
    message = str(error.value)
    assert "vocab.json" in message and "merges.txt" in message and "shared/gpt2-tokenizer" in message
