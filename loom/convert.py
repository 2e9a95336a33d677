"""`loom convert`: Hugging Face folders (config.json + safetensors) <-> loom checkpoints, for
every family with a Hugging Face architecture (loom.models.hf: Llama, Nemotron, GPT-2 for GPT-3,
BERT).

Import reads safetensors only (never pickled `.bin` files) and writes a weights-only loom
checkpoint that `checkpoint.resume=PATH` starts a run from under any layout, one tensor at a
time (read from the memory-mapped file as the checkpoint writes it). Export reads a loom
checkpoint (training or imported) a shard at a time and writes safetensors shards, their index and
config.json, so memory stays near one shard whatever the model's size.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch

from loom.models.hf import EXPORT_DTYPES, HFAdapter, HFFormatError, adapter_for, adapter_for_hf
from loom.models.registry import MODELS
from loom.models.transformer import ModelConfig, build_model
from loom.peft import weight_source
from loom.train.checkpoint_files import (TMP_PREFIX, CheckpointError, check_files, read_manifest, save_model_weights,
                                         saved_model_config)


def model_config_overrides(cfg: ModelConfig) -> tuple[str, list[str]]:
    """(model.name, [--model.key=value ...]) that make a loom config describe `cfg`: a registry
    entry with the same RoPE scaling, plus the fields that differ."""
    for name, known in MODELS.items():
        if known == cfg:
            return name, []
    bases = [n for n, m in MODELS.items() if m.rope_scaling == cfg.rope_scaling and m.family == cfg.family]
    if not bases:
        raise HFFormatError(f"RoPE scaling {cfg.rope_scaling} matches no {cfg.family} registry model; loom "
                            f"configs cannot set model.rope_scaling")
    base = min(bases, key=lambda n: sum(getattr(MODELS[n], f.name) != getattr(cfg, f.name)
                                        for f in dataclasses.fields(cfg)))
    overrides = [f"--{_override_key(f.name)}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                 if f.name not in ("rope_scaling", "family") and getattr(MODELS[base], f.name) != getattr(cfg, f.name)]
    return base, overrides


def _override_key(field: str) -> str:
    """A ModelConfig field's config key: model.<field>, or moe.<key> for the MoE fields."""
    if field.startswith("moe_"):
        key = field.removeprefix("moe_")
        return f"moe.{'n_experts' if key == 'experts' else key}"
    return f"model.{field}"


def _hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise HFFormatError(f"{index}: not a safetensors index ({e})") from None
        return sorted({folder / f for f in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")) or list(folder.glob("*.pth")):
        raise HFFormatError(f"{folder} holds only pickled weights (.bin/.pt); loom reads safetensors and never "
                            f"unpickles files; re-save them with save_pretrained(safe_serialization=True)")
    raise HFFormatError(f"{folder}: no *.safetensors weights")


# safetensors dtype names -> torch dtypes (what HF checkpoints carry).
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _read_hf_config(folder: Path) -> tuple[dict, ModelConfig, HFAdapter]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFFormatError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{config_path}: not JSON ({e})") from None
    adapter = adapter_for_hf(hf_cfg, str(config_path))
    return hf_cfg, adapter.config_from_hf(hf_cfg, str(config_path)), adapter


def _index_hf_tensors(folder: Path, adapter: HFAdapter, cfg: ModelConfig) -> dict[str, tuple[Path, str, tuple, torch.dtype]]:
    """Canonical HF key -> (file, key as stored, shape, dtype) of every tensor that is a
    parameter, read from the safetensors headers only (no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    index = {}
    for f in _hf_weight_files(folder):
        if not f.is_file():
            raise HFFormatError(f"{f}: listed in the index but missing")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    canonical = adapter.canonical_key(key)
                    if adapter.is_ignored(canonical, cfg):
                        continue
                    info = sf.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(info.get_dtype())
                    if dtype is None:
                        raise HFFormatError(f"{f}: tensor {key!r} has dtype {info.get_dtype()}; allowed: "
                                            f"{', '.join(_SAFETENSORS_DTYPES)}")
                    index[canonical] = (f, key, tuple(info.get_shape()), dtype)
        except SafetensorError as e:
            raise HFFormatError(f"{f}: not a readable safetensors file ({e})") from None
    return index


def _plan_import(index: dict, cfg: ModelConfig, adapter: HFAdapter, folder: Path) -> dict:
    """loom name -> ([HF index entries], transform), every loom parameter checked against the
    shape its HF tensors give (the transform applied to meta tensors); no HF tensor unused."""
    expected = {n: tuple(p.shape) for n, p in build_model(cfg, "meta").named_parameters()}
    rules = adapter.import_rules(cfg)
    plan, used = {}, set()
    for name, shape in expected.items():
        keys, transform = rules[name]
        keys = [adapter.canonical_key(k) for k in ([keys] if isinstance(keys, str) else keys)]
        for key in keys:
            if key not in index:
                raise HFFormatError(f"{folder}: no tensor {key!r}")
        got = tuple(transform(*(torch.empty(index[k][2], device="meta") for k in keys)).shape)
        if got != shape:
            raise HFFormatError(f"{folder}: tensor {keys[0]!r} has shape {index[keys[0]][2]}, config.json implies "
                                f"{shape} for loom's {name}")
        plan[name] = ([index[k] for k in keys], transform)
        used.update(keys)
    extra = sorted(set(index) - used)
    if extra:
        raise HFFormatError(f"{folder}: tensor {extra[0]!r} is not part of a {adapter.architecture} model "
                            f"with config.json's num_hidden_layers={cfg.n_layers}")
    return plan


def import_hf(folder: str | Path, output: str | Path) -> tuple[Path, ModelConfig]:
    """Hugging Face Llama folder -> weights-only loom checkpoint at `output`, streamed: each
    tensor is read from its memory-mapped safetensors file when the checkpoint writes it, so
    memory stays near the largest tensor (not the model: 810 GB for 405B in bf16)."""
    from safetensors import safe_open

    folder = Path(folder)
    hf_cfg, cfg, adapter = _read_hf_config(folder)
    if Path(output).exists():
        raise CheckpointError(f"checkpoint {output} already exists; nothing was overwritten")
    plan = _plan_import(_index_hf_tensors(folder, adapter, cfg), cfg, adapter, folder)

    def load(name: str) -> torch.Tensor:
        entries, transform = plan[name]
        tensors = []
        for f, key, _, _ in entries:
            with safe_open(str(f), framework="pt") as sf:
                tensors.append(sf.get_tensor(key))
        return transform(*tensors)

    described = {name: transform(*(torch.empty(shape, dtype=dtype, device="meta") for _, _, shape, dtype in entries))
                 for name, (entries, transform) in plan.items()}
    name, _ = model_config_overrides(cfg)
    path = save_model_weights(described, cfg, output, name, source=str(folder.resolve()), load=load)
    return path, cfg


def export_hf(checkpoint: str | Path, output: str | Path, dtype: str = "bfloat16",
              max_shard_bytes: int = 5 * 1024**3) -> tuple[Path, list[Path]]:
    """loom checkpoint -> Hugging Face folder `output` (config.json, safetensors shards and, if
    more than one, model.safetensors.index.json); a LoRA checkpoint's base with its adapters
    merged (W + alpha/r B A). Returns (folder, shard files)."""
    from safetensors.torch import save_file

    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and any(output.iterdir()):
        raise HFFormatError(f"--output {output} exists and is not empty; nothing was overwritten")
    manifest = read_manifest(checkpoint)
    check_files(checkpoint, manifest, checksums=True)
    cfg = saved_model_config(manifest)
    adapter = adapter_for(cfg)
    source = weight_source(checkpoint, manifest, cfg)  # a LoRA checkpoint: its base, adapters merged
    shapes = source.shapes
    names = [n for n, _ in build_model(cfg, "meta").named_parameters()]
    missing = [n for n in names if n not in shapes]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} has no tensor model.{missing[0]}")
    out_dtype = EXPORT_DTYPES[dtype]
    item = torch.empty((), dtype=out_dtype).element_size()
    rules = adapter.export_rules(cfg)

    shards: list[list[str]] = [[]]  # HF keys per file; a key's loom sources are read together
    size = 0
    for key, (sources, _) in rules.items():
        nbytes = item * sum(int(torch.Size(shapes[n]).numel()) for n in sources)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes

    tmp = output.with_name(f"{TMP_PREFIX}{output.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        loaded = source.read([n for key in group for n in rules[key][0]])
        out = {key: rules[key][1](*(loaded[n] for n in rules[key][0])).to(out_dtype).contiguous() for key in group}
        save_file(out, str(tmp / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in out.values())
        weight_map.update({k: fname for k in out})
        files.append(output / fname)
        del loaded, out
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(adapter.hf_config(cfg, dtype), indent=2))
    if output.exists():
        output.rmdir()  # empty, checked above
    os.rename(tmp, output)
    return output, files
