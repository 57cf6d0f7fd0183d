"""Shared test set-up: offline, quiet, 2 threads, and a tiny random GPT-2 with an in-code BPE tokenizer."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tiny models gain nothing from two, and two threads crawl when the other core is busy.
torch.set_num_threads(1)

from tests_support import make_tiny_gpt2, make_tokenizer, SENTENCES  # noqa: E402,F401


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def tiny_gpt2(tokenizer):
    """A fresh tiny random GPT-2 (2 layers, width 32) per test: tests may edit it freely."""
    return make_tiny_gpt2(len(tokenizer))


@pytest.fixture(scope="session")
def stats_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "text.txt"
    path.write_text("\n".join(SENTENCES * 8) + "\n")
    return path
