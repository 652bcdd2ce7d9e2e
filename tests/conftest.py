"""Test setup shared by every test module.

Triton runs on CPU only through its interpreter, which must be chosen before the first
`import triton`; setting it here, before any test imports the compiler, makes the Triton
kernels runnable in tests. The cache goes to a per-session folder unless the caller set one,
so tests never depend on (or damage) a user's cache, while the real model's converted weights
are reused across runs through COMPILER_CACHE_DIR when CI sets it.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
