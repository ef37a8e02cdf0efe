"""Training checkpoints of :func:`galleria.fusion.train.fit_fusion`: one safetensors file.

It holds the current and the best weights, the optimiser moments and a JSON
``meta`` (data digest, recipe, history, where the run stands); it is written
atomically, so a ``kill -9`` leaves the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from galleria.errors import FormatError
from galleria.io.atomic import write_bytes

CHECKPOINT_TYPE = "fusion-checkpoint"
CHECKPOINT_VERSION = 1


def opt_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, json.dumps(groups)


def load_opt_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: str
                   ) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v.clone()
    opt.load_state_dict({"state": state, "param_groups": json.loads(groups)})


def save_checkpoint(path: Path, run: Any, opt: torch.optim.Optimizer,
                    best: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    from safetensors.torch import save  # lazy: safetensors

    tensors = {f"cur.{k}": v.detach().contiguous() for k, v in run.modules_state().items()}
    tensors.update({f"best.{k}": v for k, v in best.items()})
    ot, groups = opt_state(opt)
    tensors.update(ot)
    md = {"type": CHECKPOINT_TYPE, "format_version": str(CHECKPOINT_VERSION),
          "meta": json.dumps(meta), "opt_groups": groups}
    write_bytes(path, save(tensors, metadata=md))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open  # lazy: safetensors
    from safetensors.torch import load_file  # lazy: safetensors

    try:
        with safe_open(str(path), framework="pt") as fh:
            md = fh.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # a truncated or foreign file
        raise FormatError(f"{path} is not a readable fusion checkpoint: {exc}") from exc
    if md.get("type") != CHECKPOINT_TYPE or md.get("format_version") != str(CHECKPOINT_VERSION):
        raise FormatError(f"{path} is not a fusion checkpoint (version {CHECKPOINT_VERSION})")
    return tensors, md
