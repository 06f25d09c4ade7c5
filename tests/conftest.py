import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny import save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def gpt2_folder(tmp_path_factory):
    """A tiny GPT-2-style model: no pad token, no chat template."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "gpt2", "gpt2")


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    """A tiny Llama-style model: pad == eos, a chat template."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")
