"""grpo: train language models with GRPO (Group Relative Policy Optimization) from the command line."""

import os as _os

__version__ = "0.1.0"

# Smaller oneDNN primitive caches (grpo_cli/onednn.py), set before torch makes its first primitive;
# ideep and oneDNN read these when they do.
ONEDNN_CACHES = {"LRU_CACHE_CAPACITY": "32", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}
for _name, _value in ONEDNN_CACHES.items():
    _os.environ.setdefault(_name, _value)
