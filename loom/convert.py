"""`loom convert`: Hugging Face Llama folders (config.json + safetensors) <-> loom checkpoints.

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

from loom.models.hf import HFFormatError, hf_config_from_llama, hf_param_name, llama_config_from_hf, loom_param_name
from loom.models.transformer import ModelConfig, RopeScaling, build_model
from loom.models.registry import MODELS
from loom.train.checkpoint_files import (TMP_PREFIX, CheckpointError, check_files, checkpoint_tensor_shapes,
                                         load_model_tensors, read_manifest, save_model_weights)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tensors some Hugging Face Llama checkpoints carry that are not parameters.
_IGNORED = ("rotary_emb.inv_freq",)


def model_config_overrides(cfg: ModelConfig) -> tuple[str, list[str]]:
    """(model.name, [--model.key=value ...]) that make a loom config describe `cfg`: a registry
    entry with the same RoPE scaling, plus the fields that differ."""
    for name, known in MODELS.items():
        if known == cfg:
            return name, []
    bases = [n for n, m in MODELS.items() if m.rope_scaling == cfg.rope_scaling]
    if not bases:
        raise HFFormatError(f"RoPE scaling {cfg.rope_scaling} matches no registry model; loom configs "
                            f"cannot set model.rope_scaling")
    base = min(bases, key=lambda n: sum(getattr(MODELS[n], f.name) != getattr(cfg, f.name)
                                        for f in dataclasses.fields(cfg)))
    overrides = [f"--model.{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                 if f.name != "rope_scaling" and getattr(MODELS[base], f.name) != getattr(cfg, f.name)]
    return base, overrides


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


def _read_hf_config(folder: Path) -> tuple[dict, ModelConfig]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise HFFormatError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        hf_cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{config_path}: not JSON ({e})") from None
    return hf_cfg, llama_config_from_hf(hf_cfg, str(config_path))


def _index_hf_tensors(folder: Path) -> dict[str, tuple[Path, str, tuple[int, ...], torch.dtype]]:
    """loom name -> (file, HF key, shape, dtype) of every weight, read from the safetensors
    headers only (no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    index = {}
    for f in _hf_weight_files(folder):
        if not f.is_file():
            raise HFFormatError(f"{f}: listed in the index but missing")
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    name = loom_param_name(key)
                    if name is None:
                        if key.endswith(_IGNORED):
                            continue
                        raise HFFormatError(f"{f}: tensor {key!r} is not part of a Llama model")
                    info = sf.get_slice(key)
                    dtype = _SAFETENSORS_DTYPES.get(info.get_dtype())
                    if dtype is None:
                        raise HFFormatError(f"{f}: tensor {key!r} has dtype {info.get_dtype()}; allowed: "
                                            f"{', '.join(_SAFETENSORS_DTYPES)}")
                    index[name] = (f, key, tuple(info.get_shape()), dtype)
        except SafetensorError as e:
            raise HFFormatError(f"{f}: not a readable safetensors file ({e})") from None
    return index


def _check_hf_tensors(index: dict, cfg: ModelConfig, folder: Path) -> None:
    expected = {n: tuple(p.shape) for n, p in build_model(cfg, "meta").named_parameters()}
    for name, shape in expected.items():
        if name not in index:
            raise HFFormatError(f"{folder}: no tensor {hf_param_name(name)!r}")
        if index[name][2] != shape:
            raise HFFormatError(f"{folder}: tensor {hf_param_name(name)!r} has shape {index[name][2]}, "
                                f"config.json implies {shape}")
    extra = sorted(set(index) - set(expected))
    if extra:
        raise HFFormatError(f"{folder}: tensor {hf_param_name(extra[0])!r} is beyond config.json's "
                            f"num_hidden_layers={cfg.n_layers}")


def import_hf(folder: str | Path, output: str | Path) -> tuple[Path, ModelConfig]:
    """Hugging Face Llama folder -> weights-only loom checkpoint at `output`, streamed: each
    tensor is read from its memory-mapped safetensors file when the checkpoint writes it, so
    memory stays near the largest tensor (not the model: 810 GB for 405B in bf16)."""
    from safetensors import safe_open

    folder = Path(folder)
    hf_cfg, cfg = _read_hf_config(folder)
    if Path(output).exists():
        raise CheckpointError(f"checkpoint {output} already exists; nothing was overwritten")
    index = _index_hf_tensors(folder)
    if "output.weight" not in index and hf_cfg.get("tie_word_embeddings") and "tok_embeddings.weight" in index:
        index["output.weight"] = index["tok_embeddings.weight"]  # loom's output layer is untied: a copy
    _check_hf_tensors(index, cfg, folder)

    def load(name: str) -> torch.Tensor:
        f, key, _, _ = index[name]
        with safe_open(str(f), framework="pt") as sf:
            return sf.get_tensor(key)

    described = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (_, _, shape, dtype) in index.items()}
    name, _ = model_config_overrides(cfg)
    path = save_model_weights(described, cfg, output, name, source=str(folder.resolve()), load=load)
    return path, cfg


def _config_from_manifest(fields: dict) -> ModelConfig:
    fields = dict(fields)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
    return ModelConfig(**fields)


def export_hf(checkpoint: str | Path, output: str | Path, dtype: str = "bfloat16",
              max_shard_bytes: int = 5 * 1024**3) -> tuple[Path, list[Path]]:
    """loom checkpoint -> Hugging Face folder `output` (config.json, safetensors shards and, if
    more than one, model.safetensors.index.json). Returns (folder, shard files)."""
    from safetensors.torch import save_file

    checkpoint, output = Path(checkpoint), Path(output)
    if output.exists() and any(output.iterdir()):
        raise HFFormatError(f"--output {output} exists and is not empty; nothing was overwritten")
    manifest = read_manifest(checkpoint)
    check_files(checkpoint, manifest, checksums=True)
    cfg = _config_from_manifest(manifest["model"])
    shapes = checkpoint_tensor_shapes(checkpoint)
    names = [n for n, _ in build_model(cfg, "meta").named_parameters()]
    missing = [n for n in names if n not in shapes]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} has no tensor model.{missing[0]}")
    out_dtype = DTYPES[dtype]
    item = torch.empty((), dtype=out_dtype).element_size()

    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        nbytes = item * int(torch.Size(shapes[n]).numel())
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes

    tmp = output.with_name(f"{TMP_PREFIX}{output.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files, weight_map, total = [], {}, 0
    for i, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        loaded = load_model_tensors(checkpoint, group, shapes)
        out = {hf_param_name(n): t.to(out_dtype).contiguous() for n, t in loaded.items()}
        save_file(out, str(tmp / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in out.values())
        weight_map.update({k: fname for k in out})
        files.append(output / fname)
        del loaded, out
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(hf_config_from_llama(cfg, dtype), indent=2))
    if output.exists():
        output.rmdir()  # empty, checked above
    os.rename(tmp, output)
    return output, files
