"""Saved progress of long sweeps: finished units of patches on disk, so that a killed run
resumes where it stopped. Each unit is one safetensors file, written atomically (temporary
file, then rename), so a kill mid-write leaves no half unit behind."""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["UnitStore"]


class UnitStore:
    """A directory of finished units, keyed by name: ``{metric name: tensor}`` each."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        p = self._path(key)
        return load_file(str(p)) if p.is_file() else None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = self.root / f".{key}.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self._path(key))

    def __len__(self) -> int:
        return sum(1 for _ in self.root.glob("*.safetensors"))
