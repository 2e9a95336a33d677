"""Run configuration: frozen dataclasses, one per section, loaded from TOML and overridden
from the command line with `--section.key=value`. `validate` checks everything that can be
checked before any work starts; every error is a `ConfigError` whose message is one line
naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from loom.data.checks import check_data_files, check_data_section
from loom.data.dataset import BUILTIN_STDLIB
from loom.models.registry import MODELS, UnknownModelError, get_model_config
from loom.models.transformer import ModelConfig, check_model_config
from loom.parallel.settings import check_parallel
from loom.settings import SettingError, did_you_mean, need
from loom.train.resume import check_checkpoint_files, check_checkpoint_section
from loom.train.outputs import check_output_paths
from loom.train.report import check_metrics
from loom.train.settings import check_train


ConfigError = SettingError  # a bad setting: one line naming the key, the value and what is allowed


@dataclass(frozen=True)
class ModelSection:
    name: str = "tiny"
    # Overrides of the registry entry's fields; None keeps the published value.
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    ffn_dim: int | None = None
    vocab_size: int | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    max_seq_len: int | None = None
    # The family's parts (loom.models.transformer); None keeps the registry entry's.
    norm: str | None = None
    mlp: str | None = None
    positions: str | None = None
    norm_position: str | None = None
    bias: bool | None = None
    tie_embeddings: bool | None = None
    causal: bool | None = None
    kv_channels: int | None = None
    rotary_fraction: float | None = None
    token_types: int | None = None
    mlm_head: bool | None = None
    init_std: float | None = None

    def resolve(self) -> ModelConfig:
        base = get_model_config(self.name)
        overrides = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "name" and getattr(self, f.name) is not None
        }
        return dataclasses.replace(base, **overrides)




@dataclass(frozen=True)
class ParallelSection:
    # The embedded default runs 4 ranks on a laptop: FSDP over 2 x a 2-stage pipeline.
    dp_replicate: int = 1
    dp_shard: int = 2  # -1: whatever the world size leaves after the other degrees
    tp: int = 1
    cp: int = 1
    pp: int = 2
    pp_schedule: str = "1f1b"
    pp_virtual_stages: int = 1
    cp_comm: str = "p2p"
    cp_load_balance: bool = True
    sequence_parallel: bool = True
    # FSDP's sharding: 3 frees gathered parameters after each forward and reduce-scatters
    # gradients every micro-batch; 1 keeps both whole through a step (Megatron's distributed
    # optimizer). See loom/parallel/fsdp.py.
    zero: int = 3
    # Expert parallelism: MoE experts split over ep ranks borrowed from dp_shard x cp (see
    # loom/parallel/expert.py); 1 keeps every expert on every rank (FSDP-sharded).
    ep: int = 1


@dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    seq_len: int = 256
    micro_batch: int = 2
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel ranks
    lr: float = 2e-3
    warmup_steps: int = 16
    min_lr: float = 2e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    dtype: str = "float32"
    recompute: str = "none"
    seed: int = 0
    eval_every: int = 25  # steps between validation passes; 0: only at the end
    eval_batches: int = 4  # micro-batches per validation pass
    device: str = "auto"
    compile: bool = False
    # CPU kernels: 'loom' (loom's AVX-512 kernels, an error where they cannot run), 'torch'
    # (PyTorch's ops), 'auto' (loom's where they run). See loom/models/converters.py.
    kernels: str = "auto"
    # FP8 linears through torchao (on top of dtype="bfloat16"): 'none', 'tensorwise', 'rowwise'.
    # See loom/models/fp8.py.
    fp8: str = "none"
    # Under FP8: the first and last N blocks keep their linears in bf16 (NeMo's option).
    fp8_bf16_blocks: int = 0
    # A non-finite loss or gradient norm: 'stop' the run (naming the step), or 'skip' the step
    # (the weights are left as they were). Either way such values never reach the weights.
    on_nonfinite: str = "stop"
    # Stop after this step with a checkpoint (0: run to train.steps), to fit a job into a
    # scheduler's time slot; the next launch resumes (Megatron's --exit-interval, once).
    stop_at: int = 0
    # Seconds any collective may wait for the other ranks (torch's process-group timeout): a
    # rank stopped, hung or gone then ends the job with one line instead of hanging it.
    timeout_s: float = 600.0


@dataclass(frozen=True)
class DataSection:
    path: str = BUILTIN_STDLIB
    tokenizer: str = ""  # tokenizer.json; for a prepared dataset its own tokenizer is the default
    # Attention stays inside each document of a packed sequence, and RoPE positions restart at
    # every document (Megatron's reset_attention_mask + reset_position_ids).
    pack_documents: bool = False
    # 'tokens': documents to pretrain on (`loom prepare`); 'sft': fine-tuning examples with loss
    # masks (`loom prepare --format sft`, or builtin:python-stdlib-sft), packed by first-fit-
    # decreasing into train.seq_len, each example attending only to itself (loom/data/packing.py).
    format: str = "tokens"
    # A mixture of datasets, [[weight, path], ...] (weights normalized), sampled as Megatron
    # blends (loom/data/blend.py); empty: data.path alone. On the command line a JSON list.
    blend: tuple = ()


@dataclass(frozen=True)
class CheckpointSection:
    dir: str = ""  # empty: no checkpoints
    every: int = 0
    keep: int = 2  # complete checkpoints kept; older ones are deleted
    resume: str = "auto"  # auto (newest in dir, if any) | never | a checkpoint folder
    # A checkpoint whose weights start a run that has nothing to resume (a pretrained base, or
    # `loom convert --from-hf` output): its weights only; its optimizer, step and data stream
    # are not carried over. Empty: the seed's initialization.
    init_from: str = ""
    async_save: bool = False  # write in the background; training waits only for a host copy
    on_error: str = "stop"  # a failed save (a full disk): "stop" the run, or "continue" training without it


@dataclass(frozen=True)
class MoESection:
    """Mixture of experts (loom/models/moe.py); None keeps the registry entry's value (dense
    models have n_experts 0)."""

    n_experts: int | None = None
    top_k: int | None = None
    capacity_factor: float | None = None  # unset: dropless; else tokens beyond it are dropped
    aux_loss_coeff: float | None = None  # Switch load balancing (the registry's MoE models: 0.01)
    z_loss_coeff: float | None = None  # router z-loss (0 unless set)

    def apply(self, model: ModelConfig) -> ModelConfig:
        overrides = {f"moe_{f.name.removeprefix('n_')}": getattr(self, f.name) for f in dataclasses.fields(self)
                     if getattr(self, f.name) is not None}
        return dataclasses.replace(model, **overrides)


@dataclass(frozen=True)
class LoRASection:
    """LoRA adapters (loom/models/lora.py): rank 0 trains every parameter (no LoRA)."""

    rank: int = 0
    alpha: float = 32.0  # the adapters' output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    targets: str = "all"  # 'all' or a comma-separated list of q, k, v, o, gate, up, down
    base_dtype: str = "float32"  # 'bfloat16' holds the blocks' frozen projections in bf16 (train.dtype bfloat16)

    def spec(self, model: ModelConfig):
        """The LoRASpec of this section for `model`, or None without LoRA (validated first)."""
        from loom.models.lora import LoRASpec, parse_targets

        if self.rank == 0:
            return None
        return LoRASpec(self.rank, self.alpha, self.dropout,
                        parse_targets(self.targets, model.gated, bool(model.moe_experts)), self.base_dtype == "bfloat16")


@dataclass(frozen=True)
class MetricsSection:
    jsonl: str = "runs/loom/metrics.jsonl"
    tensorboard: str = ""  # a directory, or empty for none
    wandb: str = ""  # a Weights & Biases "project" or "project/run", or empty for none
    plot: str = "runs/loom/loss.png"  # loss curve written at the end; empty for none
    log_every: int = 10


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    train: TrainSection = field(default_factory=TrainSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    moe: MoESection = field(default_factory=MoESection)
    lora: LoRASection = field(default_factory=LoRASection)

    def model_config(self) -> ModelConfig:
        """The registry entry with the [model] and [moe] overrides (not validated)."""
        return self.moe.apply(self.model.resolve())


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _field_types(section_cls: type) -> dict[str, object]:
    return typing.get_type_hints(section_cls)


def _type_name(tp: object) -> str:
    base = _strip_optional(tp)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            tuple: "a list"}[base]


def _strip_optional(tp: object) -> type:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp  # type: ignore[return-value]


def _coerce(key: str, value: object, tp: object, from_cli: bool) -> object:
    """Convert a TOML value or a command-line string to the field's type, or raise ConfigError."""
    base = _strip_optional(tp)
    shown = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    if from_cli and isinstance(value, str):
        text = value.strip()
        if base is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
        elif base is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif base is float:
            try:
                return float(text)
            except ValueError:
                pass
        elif base is str:
            return text
        elif base is tuple:
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                raise ConfigError(f"{key}={value!r} is not a list (a JSON list on the command line)") from None
            return _coerce(key, parsed, tp, from_cli=False)  # then as a TOML value
        raise ConfigError(f"{key}={value!r} is not {_type_name(tp)}")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is tuple and isinstance(value, (list, tuple)):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}={shown} is not {_type_name(tp)}")


def _split_override(arg: str) -> tuple[str, str, str]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"argument {arg!r} is not an override; allowed form: --section.key=value")
    name, value = arg[2:].split("=", 1)
    if "." not in name:
        raise ConfigError(f"argument {arg!r} names no section; allowed form: --section.key=value")
    section, key = name.split(".", 1)
    return section, key, value


def _check_section(section: str, origin: str) -> type:
    if section not in SECTIONS:
        raise ConfigError(
            f"unknown section [{section}] in {origin}{did_you_mean(section, SECTIONS)}; "
            f"allowed: {', '.join(SECTIONS)}"
        )
    return SECTIONS[section]


def _check_key(section: str, key: str, origin: str) -> object:
    types_ = _field_types(SECTIONS[section])
    if key not in types_:
        raise ConfigError(
            f"unknown key {section}.{key} in {origin}{did_you_mean(key, types_)}; "
            f"allowed: {', '.join(types_)}"
        )
    return types_[key]


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file, then `--section.key=value` overrides. Not yet validated."""
    values: dict[str, dict[str, object]] = {name: {} for name in SECTIONS}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config={path!r}: no such file")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"--config={path!r} is not valid TOML: {e}") from None
        for section, table in data.items():
            _check_section(section, path)
            if not isinstance(table, dict):
                raise ConfigError(f"[{section}] in {path} must be a table of keys, got {table!r}")
            for key, value in table.items():
                tp = _check_key(section, key, path)
                values[section][key] = _coerce(f"{section}.{key}", value, tp, from_cli=False)
    for arg in overrides:
        section, key, value = _split_override(arg)
        _check_section(section, "the command line")
        tp = _check_key(section, key, "the command line")
        values[section][key] = _coerce(f"{section}.{key}", value, tp, from_cli=True)
    return Config(**{name: SECTIONS[name](**vals) for name, vals in values.items()})


def check_lora(lora: LoRASection, model: ModelConfig, train, parallel) -> None:
    """The [lora] section: a positive rank (0: no LoRA, and then no other lora key set), targets
    the model has, and what LoRA does not combine with."""
    from loom.models.lora import parse_targets

    changed = [f"lora.{f.name}={getattr(lora, f.name)!r}" for f in dataclasses.fields(lora)
               if f.name != "rank" and getattr(lora, f.name) != f.default]
    need(lora.rank > 0 or (lora.rank == 0 and not changed),
         f"lora.rank={lora.rank} must be a positive integer (the adapters' rank)"
         + (f" for {', '.join(changed)} to apply" if changed and lora.rank == 0 else "")
         + "; allowed: lora.rank >= 1, or 0 (and no other lora key) to train every parameter")
    if lora.rank == 0:
        return
    need(lora.alpha > 0, f"lora.alpha={lora.alpha} must be positive (the adapters are scaled by alpha / rank)")
    need(0 <= lora.dropout < 1, f"lora.dropout={lora.dropout} must be in [0, 1)")
    try:
        parse_targets(lora.targets, model.gated, bool(model.moe_experts))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    from loom.settings import one_of

    one_of("lora.base_dtype", lora.base_dtype, ("float32", "bfloat16"))
    need(lora.base_dtype == "float32" or train.dtype == "bfloat16",
         f"lora.base_dtype='bfloat16' needs train.dtype='bfloat16' (the frozen weights then enter bf16 products "
         f"only), not {train.dtype!r}; allowed with float32: lora.base_dtype='float32'")
    need(train.fp8 == "none", f"train.fp8={train.fp8!r} does not combine with LoRA (lora.rank={lora.rank}) yet; "
                              f"allowed with LoRA: train.fp8='none'")
    need(parallel.pp_schedule != "zero-bubble" or parallel.pp == 1,
         "parallel.pp_schedule='zero-bubble' splits the backward by weights, which LoRA's frozen base does not "
         "have; allowed with LoRA: 1f1b, interleaved-1f1b, gpipe")


def validate_files(cfg: Config, model: ModelConfig) -> None:
    """The checks that read the disk: the dataset, the tokenizer, the checkpoint to resume, and
    the outputs (writable, room for a checkpoint)."""
    check_data_files(cfg.data, cfg.train.seq_len, model, cfg.model.name)
    check_checkpoint_files(cfg, model)
    check_output_paths(cfg, model)


def validate(cfg: Config, world_size: int | None = None, check_files: bool = True) -> ModelConfig:
    """Check every setting; return the resolved model config. Raises ConfigError.

    Each subsystem owns its allowed values and checks (models, train, parallel, checkpoint,
    metrics, data); this composes them in order. world_size: the ranks the job has (torchrun's
    WORLD_SIZE, or --nproc), or None where the layout decides (parallel.dp_shard=-1 then counts
    as 1). check_files=False skips what reads the disk (data, tokenizer, checkpoints): a dry run
    needs none of them.
    """
    try:
        model = cfg.model_config()
    except UnknownModelError as e:
        raise ConfigError(str(e)) from None
    check_model_config(model)
    check_train(cfg.train, model, cfg.checkpoint.dir)
    check_parallel(cfg.parallel, model, cfg.train, world_size)
    check_checkpoint_section(cfg.checkpoint)
    check_metrics(cfg.metrics)
    check_data_section(cfg.data, model, cfg.model.name)
    check_lora(cfg.lora, model, cfg.train, cfg.parallel)
    if check_files:
        validate_files(cfg, model)
    return model


__all__ = [
    "BUILTIN_STDLIB", "Config", "ConfigError", "load_config", "validate", "MODELS",
]
