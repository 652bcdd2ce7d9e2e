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
