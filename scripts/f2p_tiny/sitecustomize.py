"""Registers the tiny Qwen-Image-Edit fixture with DiffSynth-Studio in any Python process
started with this folder on PYTHONPATH (Python imports `sitecustomize` at start-up).

When `diffsynth.configs` is first imported, the entries in `model_configs.json` (written
by scripts/f2p_tiny/make.py: each tiny file's hash and the class that builds it, see
hotpipe_f2p_tiny.py) are appended to its `MODEL_CONFIGS` list, the registry DiffSynth's
loader scans. Nothing else changes: the pipeline, the loader and the LoRA path are
DiffSynth's own, and a process that never imports diffsynth pays nothing.
"""

import importlib.abc
import importlib.machinery
import json
import sys
from pathlib import Path

_ENTRIES = Path(__file__).with_name("model_configs.json")


class _RegisterTinyModels(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "diffsynth.configs":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            entries = json.loads(_ENTRIES.read_text())
            known = {c["model_hash"] for c in module.MODEL_CONFIGS}
            module.MODEL_CONFIGS.extend(e for e in entries if e["model_hash"] not in known)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _RegisterTinyModels())
