"""LoRA checkpoints <-> Hugging Face PEFT, and the weights a LoRA checkpoint stands for.

A loom LoRA checkpoint holds adapters only (`layers.N.<projection>.lora_a` [rank, in], `.lora_b`
[out, rank]) and names its base checkpoint (loom.train.checkpoint). PEFT's format is a folder:
    adapter_config.json          {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors    base_model.model.<HF module>.lora_A.weight [r, in], .lora_B.weight [out, r]
with Hugging Face module names (the family adapter's, loom.models.hf), which
`peft.PeftModel.from_pretrained` loads onto the exported base. Merged weights are W + (alpha/r) B A,
exported as a plain Hugging Face model by `loom convert --to-hf` (loom.convert).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from loom.models.hf import EXPORT_DTYPES, HFFormatError, adapter_for
from loom.models.lora import is_adapter, merged_weight
from loom.models.transformer import ModelConfig
from loom.train.checkpoint_files import (TMP_PREFIX, CheckpointError, check_base, check_files,
                                         checkpoint_tensor_shapes, load_model_tensors, read_manifest,
                                         save_model_weights, saved_model_config)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class WeightSource:
    """The model weights a checkpoint stands for, read a few tensors at a time: a whole-model
    checkpoint's own, or a LoRA checkpoint's base with its adapters merged in."""

    checkpoint: Path
    shapes: dict[str, tuple[int, ...]]  # loom parameter name -> shape (the base model's)
    base: Path | None = None  # a LoRA checkpoint's base
    adapters: dict[str, torch.Tensor] | None = None  # a LoRA checkpoint's, whole (they are small)
    scaling: float = 1.0

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        if self.base is None:
            return load_model_tensors(self.checkpoint, names, self.shapes)
        out = load_model_tensors(self.base, names, self.shapes)
        for name in names:
            stem = name.removesuffix(".weight")
            if f"{stem}.lora_a" in self.adapters:
                out[name] = merged_weight(out[name], self.adapters[f"{stem}.lora_a"], self.adapters[f"{stem}.lora_b"],
                                          self.scaling)
        return out


def weight_source(checkpoint: Path, manifest: dict, model_cfg: ModelConfig) -> WeightSource:
    """The WeightSource of a checkpoint already read and checked (checksums included)."""
    if "lora" not in manifest:
        return WeightSource(checkpoint, checkpoint_tensor_shapes(checkpoint))
    base = lora_base(checkpoint, manifest, model_cfg)
    return WeightSource(checkpoint, checkpoint_tensor_shapes(base), base, read_adapters(checkpoint),
                        manifest["lora"]["alpha"] / manifest["lora"]["rank"])


def lora_base(checkpoint: Path, manifest: dict, model_cfg: ModelConfig) -> Path:
    """The base checkpoint a LoRA checkpoint names, checked."""
    base = manifest["lora"].get("base")
    if not base:
        raise CheckpointError(f"checkpoint {checkpoint} holds LoRA adapters of a base that was the seed's "
                              f"initialization, not a checkpoint; allowed: adapters trained from checkpoint.init_from")
    return check_base(base, model_cfg, f"checkpoint {checkpoint} holds LoRA adapters of the base {base}", checksums=True)


def read_adapters(checkpoint: Path) -> dict[str, torch.Tensor]:
    shapes = checkpoint_tensor_shapes(checkpoint)
    names = [n for n in shapes if is_adapter(n)]
    return load_model_tensors(checkpoint, names, shapes)


def _hf_modules(cfg: ModelConfig) -> dict[str, str]:
    """loom module path ('layers.0.attention.wq') -> Hugging Face module path, for the families
    whose parameters map one to one (Llama, Nemotron, Mixtral's attention, BERT)."""
    try:
        names = adapter_for(cfg).names(cfg)
    except NotImplementedError:
        raise HFFormatError(f"model family {cfg.family!r} fuses projections in Hugging Face's layout, which "
                            f"PEFT adapters of loom's separate ones cannot describe; allowed: llama, nemotron, "
                            f"mixtral, bert") from None
    return {ours.removesuffix(".weight"): theirs.removesuffix(".weight")
            for ours, theirs in names.items() if ours.endswith(".weight")}


def _target_modules(adapted: list[str], all_modules: list[str]) -> list[str]:
    """PEFT's target_modules: the adapted modules' names after `layers.N.` where those suffixes
    match no other module (PEFT matches a name or a '.'-suffix of one), else the full names."""
    def suffix(m: str) -> str:
        parts = m.split(".")
        i = max(k for k, p in enumerate(parts) if p.isdigit())
        return ".".join(parts[i + 1:])

    targets = sorted({suffix(m) for m in adapted})
    hit = {m for m in all_modules if any(m == t or m.endswith("." + t) for t in targets)}
    return targets if hit == set(adapted) else sorted(adapted)


def export_peft(checkpoint: str | Path, output: str | Path, dtype: str = "float32") -> Path:
    """A loom LoRA checkpoint -> a PEFT adapter folder (written to a temporary sibling, renamed)."""
    from safetensors.torch import save_file

    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and any(output.iterdir()):
        raise HFFormatError(f"--output {output} exists and is not empty; nothing was overwritten")
    manifest = read_manifest(checkpoint)
    if "lora" not in manifest:
        raise CheckpointError(f"checkpoint {checkpoint} holds no LoRA adapters (--peft exports those); allowed: "
                              f"a checkpoint of a run with [lora] rank > 0, or --to-hf without --peft")
    check_files(checkpoint, manifest, checksums=True)
    cfg = saved_model_config(manifest)
    modules = _hf_modules(cfg)
    adapters = read_adapters(checkpoint)
    tensors, adapted = {}, []
    for name, t in adapters.items():
        stem, kind = name.rsplit(".", 1)
        module = modules[stem]
        tensors[f"{PEFT_PREFIX}{module}.{'lora_A' if kind == 'lora_a' else 'lora_B'}.weight"] = \
            t.to(EXPORT_DTYPES[dtype]).contiguous()
        adapted.append(module)
    lora = manifest["lora"]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM" if cfg.causal else None, "r": lora["rank"],
              "lora_alpha": lora["alpha"], "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": _target_modules(sorted(set(adapted)), list(modules.values())),
              "base_model_name_or_path": lora.get("base"), "inference_mode": True, "use_rslora": False,
              "use_dora": False, "modules_to_save": None, "init_lora_weights": True}
    tmp = output.with_name(f"{TMP_PREFIX}{output.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    if output.exists():
        output.rmdir()  # empty, checked above
    os.rename(tmp, output)
    return output


def import_peft(folder: str | Path, base: str | Path, output: str | Path) -> tuple[Path, dict]:
    """A PEFT LoRA folder and the loom checkpoint of its base -> a loom LoRA checkpoint (adapters
    only, step 0) that `checkpoint.resume` continues training from. Returns (path, the [lora]
    settings it needs)."""
    from safetensors.torch import load_file

    folder, base = Path(folder), Path(base)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise HFFormatError(f"{folder}: no {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (expected a PEFT LoRA folder)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise HFFormatError(f"{config_path}: peft_type={config.get('peft_type')!r}, use_dora={config.get('use_dora')}, "
                            f"use_rslora={config.get('use_rslora')}; allowed: plain LoRA")
    manifest = read_manifest(base)
    if "lora" in manifest:
        raise CheckpointError(f"--base {base} holds LoRA adapters; allowed: a checkpoint of the whole model")
    check_files(base, manifest, checksums=False)
    cfg = saved_model_config(manifest)
    by_hf = {theirs: ours for ours, theirs in _hf_modules(cfg).items()}
    tensors, targets = {}, set()
    for key, t in load_file(str(weights_path)).items():
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        ours = by_hf.get(module)
        if ours is None or kind not in ("A.weight", "B.weight"):
            raise HFFormatError(f"{weights_path}: tensor {key!r} is not a LoRA weight of a {cfg.family} projection")
        tensors[f"{ours}.lora_{kind[0].lower()}"] = t.float()
        targets.add(ours.split(".", 2)[2])
    lora = {"rank": int(config["r"]), "alpha": float(config["lora_alpha"]), "targets": _loom_targets(targets, cfg)}
    path = save_model_weights(tensors, cfg, output, manifest.get("model_name"), source=str(folder.resolve()),
                              extra={"lora": {**lora, "base": str(base.resolve())}})
    return path, lora


def _loom_targets(paths: set[str], cfg: ModelConfig) -> str:
    """The [lora] targets naming these module paths ('attention.wq', ...)."""
    from loom.models.lora import target_modules

    return ",".join(name for name, path in target_modules(cfg.gated, bool(cfg.moe_experts)).items() if path in paths)
