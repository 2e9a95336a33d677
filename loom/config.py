"""Run configuration: frozen dataclasses, one per section, loaded from TOML and overridden
from the command line with `--section.key=value`. `validate` checks everything that can be
checked before any work starts; every error is a `ConfigError` whose message is one line
naming the key, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
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

from loom.data.dataset import read_meta
from loom.models.transformer import ModelConfig, check_model_config
from loom.models.converters import KERNEL_CHOICES
from loom.settings import SettingError
from loom.models.registry import MODELS, UnknownModelError, get_model_config

BUILTIN_STDLIB = "builtin:python-stdlib"


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


PP_SCHEDULES = ("1f1b", "interleaved-1f1b", "zero-bubble", "gpipe")
CP_COMMS = ("p2p", "allgather", "a2a")


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


DTYPES = ("float32", "bfloat16")
RECOMPUTE = ("none", "full", "selective")
NONFINITE = ("stop", "skip")
DEVICES = ("auto", "cpu", "cuda")


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
    # A non-finite loss or gradient norm: 'stop' the run (naming the step), or 'skip' the step
    # (the weights are left as they were). Either way such values never reach the weights.
    on_nonfinite: str = "stop"
    # Stop after this step with a checkpoint (0: run to train.steps), to fit a job into a
    # scheduler's time slot; the next launch resumes (Megatron's --exit-interval, once).
    stop_at: int = 0


@dataclass(frozen=True)
class DataSection:
    path: str = BUILTIN_STDLIB
    tokenizer: str = ""  # tokenizer.json; for a prepared dataset its own tokenizer is the default
    # Attention stays inside each document of a packed sequence, and RoPE positions restart at
    # every document (Megatron's reset_attention_mask + reset_position_ids).
    pack_documents: bool = False


@dataclass(frozen=True)
class CheckpointSection:
    dir: str = ""  # empty: no checkpoints
    every: int = 0
    keep: int = 2  # complete checkpoints kept; older ones are deleted
    resume: str = "auto"  # auto (newest in dir, if any) | never | a checkpoint folder
    async_save: bool = False  # write in the background; training waits only for a host copy


@dataclass(frozen=True)
class MetricsSection:
    jsonl: str = "runs/loom/metrics.jsonl"
    tensorboard: str = ""  # a directory, or empty for none
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _field_types(section_cls: type) -> dict[str, object]:
    return typing.get_type_hints(section_cls)


def _type_name(tp: object) -> str:
    base = _strip_optional(tp)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[base]


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
        raise ConfigError(f"{key}={value!r} is not {_type_name(tp)}")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
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
            f"unknown section [{section}] in {origin}{_did_you_mean(section, SECTIONS)}; "
            f"allowed: {', '.join(SECTIONS)}"
        )
    return SECTIONS[section]


def _check_key(section: str, key: str, origin: str) -> object:
    types_ = _field_types(SECTIONS[section])
    if key not in types_:
        raise ConfigError(
            f"unknown key {section}.{key} in {origin}{_did_you_mean(key, types_)}; "
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


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _need(
        value in allowed,
        f"{key}={value!r} is not allowed{_did_you_mean(value, allowed)}; allowed: {', '.join(allowed)}",
    )


def data_vocab_size(data: DataSection) -> int:
    """Vocabulary size of the configured dataset's tokenizer, read without tokenizing anything."""
    from loom.data.stdlib import BUILTIN_VOCAB_SIZE

    if data.path == BUILTIN_STDLIB:
        return BUILTIN_VOCAB_SIZE
    return int(read_meta(data.path)["vocab_size"])


def validate_files(cfg: Config, model: ModelConfig) -> None:
    """The checks that read the disk: the dataset, the tokenizer, the checkpoint to resume."""
    t, c = cfg.train, cfg.checkpoint
    d = cfg.data
    if d.path != BUILTIN_STDLIB:
        _need(
            Path(d.path).is_dir() and (Path(d.path) / "meta.json").is_file(),
            f"data.path={d.path!r} is not a prepared dataset (no {Path(d.path) / 'meta.json'}); "
            f"allowed: {BUILTIN_STDLIB!r} or a folder written by `loom prepare`",
        )
    if d.tokenizer:
        _need(Path(d.tokenizer).is_file(), f"data.tokenizer={d.tokenizer!r}: no such file")
    if d.path != BUILTIN_STDLIB:
        for split, info in read_meta(d.path)["splits"].items():
            _need(
                info["tokens"] > t.seq_len,
                f"train.seq_len={t.seq_len} is longer than the {split} split of data.path={d.path!r} "
                f"({info['tokens']} tokens)",
            )
    vocab = data_vocab_size(d)
    _need(
        model.vocab_size >= vocab,
        f"model.vocab_size={model.vocab_size} is smaller than the vocabulary ({vocab}) of "
        f"data.path={d.path!r}",
    )

    if not model.causal and d.path != BUILTIN_STDLIB:  # masked-LM targets need a mask token
        from loom.data.mlm import MASK_TOKEN, mask_token_id

        tok = Path(d.path) / "tokenizer.json"
        _need(tok.is_file() and mask_token_id(tok) is not None,
              f"data.path={d.path!r}: its tokenizer has no {MASK_TOKEN} token, which masked-LM training of "
              f"model.name={cfg.model.name!r} needs; allowed: a dataset whose tokenizer has {MASK_TOKEN}")
    _need(not (c.dir and Path(c.dir).exists() and not Path(c.dir).is_dir()),
          f"checkpoint.dir={c.dir!r} is a file; allowed: a folder (created if missing)")
    from loom.train.checkpoint_files import CheckpointError, check_resume

    try:
        check_resume(cfg, model)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None


def validate(cfg: Config, world_size: int | None = None, check_files: bool = True) -> ModelConfig:
    """Check every setting; return the resolved model config. Raises ConfigError.

    world_size: the ranks the job has (torchrun's WORLD_SIZE, or --nproc), or None where the
    layout decides (parallel.dp_shard=-1 then counts as 1). check_files=False skips what reads
    the disk (data, tokenizer, checkpoints): a dry run needs none of them.
    """
    try:
        model = cfg.model.resolve()
    except UnknownModelError as e:
        raise ConfigError(str(e)) from None
    check_model_config(model)

    t = cfg.train
    _need(t.steps > 0, f"train.steps={t.steps} must be a positive integer")
    _need(t.seq_len > 0, f"train.seq_len={t.seq_len} must be a positive integer")
    _need(t.micro_batch > 0, f"train.micro_batch={t.micro_batch} must be a positive integer")
    _need(t.global_batch > 0, f"train.global_batch={t.global_batch} must be a positive integer")
    _need(t.lr > 0, f"train.lr={t.lr} must be positive")
    _need(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be between 0 and train.lr={t.lr}")
    _need(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be 0 or more")
    _need(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be 0 or more")
    _need(0 <= t.beta1 < 1, f"train.beta1={t.beta1} must be in [0, 1)")
    _need(0 <= t.beta2 < 1, f"train.beta2={t.beta2} must be in [0, 1)")
    _need(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be 0 (off) or positive")
    _need(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be 0 (end only) or positive")
    _need(t.eval_batches > 0, f"train.eval_batches={t.eval_batches} must be a positive integer")
    _one_of("train.dtype", t.dtype, DTYPES)
    _one_of("train.recompute", t.recompute, RECOMPUTE)
    _one_of("train.on_nonfinite", t.on_nonfinite, NONFINITE)
    _need(t.stop_at >= 0, f"train.stop_at={t.stop_at} must be 0 (run to train.steps) or positive")
    _need(t.stop_at == 0 or bool(cfg.checkpoint.dir),
          f"train.stop_at={t.stop_at} needs checkpoint.dir (the next launch resumes from its checkpoint)")
    _one_of("train.device", t.device, DEVICES)
    _one_of("train.kernels", t.kernels, KERNEL_CHOICES)
    if t.kernels == "loom":
        import torch

        from loom.models.converters import loom_kernels_unavailable

        on_gpu = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
        why_not = loom_kernels_unavailable(torch.device("cuda" if on_gpu else "cpu"))
        _need(why_not is None, f"train.kernels='loom' but loom's kernels cannot run here ({why_not}); "
                               f"allowed here: 'auto', 'torch'")
    if t.device == "cuda":
        import torch

        _need(torch.cuda.is_available(), "train.device='cuda' but this machine has no CUDA device; allowed: 'auto', 'cpu'")

    p = cfg.parallel
    for key in ("dp_replicate", "tp", "cp", "pp", "pp_virtual_stages"):
        v = getattr(p, key)
        _need(v >= 1, f"parallel.{key}={v} must be a positive integer")
    _need(p.dp_shard == -1 or p.dp_shard >= 1, f"parallel.dp_shard={p.dp_shard} must be -1 (fill) or a positive integer")
    _one_of("parallel.pp_schedule", p.pp_schedule, PP_SCHEDULES)
    _one_of("parallel.cp_comm", p.cp_comm, CP_COMMS)
    from loom.parallel.fsdp import ZERO_MODES

    _need(p.zero in ZERO_MODES, f"parallel.zero={p.zero} is not allowed; allowed: {', '.join(map(str, ZERO_MODES))}")
    _need(
        model.n_kv_heads % p.tp == 0,
        f"parallel.tp={p.tp} does not divide model.n_kv_heads={model.n_kv_heads}",
    )
    _need(
        model.n_layers >= p.pp * p.pp_virtual_stages,
        f"parallel.pp={p.pp} x parallel.pp_virtual_stages={p.pp_virtual_stages} stages exceed "
        f"model.n_layers={model.n_layers}",
    )
    from loom.parallel.dims import LayoutError, ParallelDims

    try:
        dims = ParallelDims.from_section(p, world_size)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    _need(
        t.global_batch % (t.micro_batch * dims.dp) == 0,
        f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch}"
        + (f" x data-parallel degree {dims.dp}" if dims.dp > 1 else ""),
    )
    if p.tp > 1:
        for key in ("vocab_size", "ffn_dim"):
            v = getattr(model, key)
            _need(v % p.tp == 0, f"parallel.tp={p.tp} does not divide model.{key}={v}")
    # Context parallelism cuts the sequence into chunks (two per rank when load-balanced), and
    # sequence parallelism then cuts each rank's share over tp.
    from loom.parallel.context.sharding import chunk_count

    chunks = chunk_count(p.cp, p.cp_load_balance)
    sp = p.tp if p.tp > 1 and p.sequence_parallel else 1
    parts = [f"{'2 x ' if chunks == 2 * p.cp else ''}parallel.cp={p.cp}"] if p.cp > 1 else []
    parts += [f"parallel.tp={p.tp} (sequence parallelism)"] if sp > 1 else []
    _need(
        t.seq_len % (chunks * sp) == 0,
        f"train.seq_len={t.seq_len} is not divisible by {' x '.join(parts)} = {chunks * sp}",
    )
    if p.cp > 1 and p.cp_comm == "a2a":
        for key in ("n_heads", "n_kv_heads"):
            v = getattr(model, key)
            _need(
                v % (p.tp * p.cp) == 0,
                f"parallel.cp_comm='a2a' needs model.{key}={v} divisible by parallel.tp x parallel.cp "
                f"= {p.tp * p.cp} (Ulysses shards heads over cp); allowed: cp_comm 'p2p' or 'allgather'",
            )
    if p.pp > 1:
        n_micro = t.global_batch // (t.micro_batch * dims.dp)
        _need(
            n_micro >= p.pp,
            f"parallel.pp={p.pp} needs at least {p.pp} micro-batches per step, but train.global_batch="
            f"{t.global_batch} / (train.micro_batch={t.micro_batch} x data-parallel degree {dims.dp}) "
            f"gives {n_micro}",
        )
        if p.pp_schedule in ("interleaved-1f1b", "zero-bubble"):
            _need(
                n_micro % p.pp == 0,
                f"parallel.pp_schedule={p.pp_schedule!r} needs micro-batches per step ({n_micro}) "
                f"divisible by parallel.pp={p.pp}",
            )
    if p.pp_virtual_stages > 1:
        _need(
            p.pp_schedule in ("interleaved-1f1b", "zero-bubble"),
            f"parallel.pp_virtual_stages={p.pp_virtual_stages} needs parallel.pp_schedule "
            f"'interleaved-1f1b' or 'zero-bubble', not {p.pp_schedule!r}",
        )

    c = cfg.checkpoint
    _need(c.every >= 0, f"checkpoint.every={c.every} must be 0 or positive")
    _need(c.keep >= 1, f"checkpoint.keep={c.keep} must be a positive integer")
    _need(c.every == 0 or bool(c.dir),
          f"checkpoint.every={c.every} needs checkpoint.dir (a folder to write checkpoints to)")
    _need(bool(c.resume), "checkpoint.resume='' must be 'auto', 'never' or a checkpoint folder")
    if check_files:
        validate_files(cfg, model)

    m = cfg.metrics
    _need(m.log_every > 0, f"metrics.log_every={m.log_every} must be a positive integer")
    _need(bool(m.jsonl), "metrics.jsonl='' must name a file")
    return model


__all__ = [
    "BUILTIN_STDLIB", "Config", "ConfigError", "load_config", "validate", "MODELS",
]
