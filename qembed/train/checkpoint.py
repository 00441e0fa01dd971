"""Training checkpoints under `OUTPUT/checkpoints/step-N/`: trainable weights (LoRA adapter or full), optimizer,
scheduler, random-number states and data position; written to a temporary folder and renamed, so a kill
mid-write never leaves a checkpoint that looks complete."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from qembed.errors import QembedError

STATE_FILE = "trainer_state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable weights into `model`; a checkpoint that does not fit (other LoRA options, another
    model) raises `QembedError`."""
    params = dict(model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    wrong = [name for name in state if name not in params or params[name].shape != state[name].shape]
    if wrong or set(state) != trainable:
        first = wrong[0] if wrong else sorted(trainable ^ set(state))[0]
        raise QembedError(f"the checkpoint's trainable weights do not fit this model ({first}): "
                          "it was trained with other --lora/--full or LoRA options, or another model")  # fmt: skip
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    state: dict[str, Any],
    *,
    keep: int | None,
    scaler=None,
) -> Path:
    """Write `directory/step-{state['step']}` atomically; keep only the newest `keep` step checkpoints."""
    final = directory / f"step-{state['step']}"
    tmp = directory / f".tmp-step-{state['step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_states(),
            "scaler": scaler.state_dict() if scaler else None,
        },
        tmp / "training.pt",
    )
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if keep:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete step checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("step-*") if (p / STATE_FILE).is_file() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, scaler=None) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from `path`; returns the saved trainer state."""
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    blob = torch.load(path / "training.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_states(blob["rng"])
    if scaler is not None and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    return json.loads((path / STATE_FILE).read_text())


def save_best(directory: Path, model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Trainable weights of the best evaluation so far, in `directory/best` (atomically replaced)."""
    tmp, final = directory / ".tmp-best", directory / "best"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
