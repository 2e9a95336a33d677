"""`loom` command line: train | prepare | flops | convert | plan | bench."""
from __future__ import annotations

import argparse
import json
import os
import sys


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage is one `--help` away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    from loom.config import ConfigError, load_config, validate

    prog = "loom train"
    under_torchrun = "WORLD_SIZE" in os.environ
    if args.dry_run or args.world is not None:
        return cmd_dry_run(args, overrides)
    if args.nproc is not None and args.nproc < 1:
        return fail(prog, f"--nproc={args.nproc} must be a positive integer")
    if under_torchrun and args.nproc is not None:
        return fail(prog, f"--nproc={args.nproc} under torchrun: torchrun already started the ranks; "
                          f"allowed: no --nproc")
    try:
        cfg = load_config(args.config, overrides)
        world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun else args.nproc
        model_cfg = validate(cfg, world_size=world_size)
    except ConfigError as e:
        return fail(prog, str(e))

    from loom.data.dataset import DataError, open_splits

    if not under_torchrun:
        from loom.parallel.dims import ParallelDims

        try:  # in this process, before any worker: builds the builtin corpora once, checks sizes
            for path in [p for _, p in cfg.data.blend] or [cfg.data.path]:
                open_splits(path, cfg.train.seq_len, progress=not args.quiet, data_format=cfg.data.format,
                            seed=cfg.train.seed, tokenizer=cfg.data.tokenizer)
        except DataError as e:
            return fail(prog, str(e))

        nproc = ParallelDims.from_section(cfg.parallel, world_size).world_size
        if nproc > 1:
            from loom.launch import launch_local

            worker_args = (["--config", args.config] if args.config else []) + overrides
            return launch_local(nproc, worker_args, args.max_restarts, quiet=args.quiet)

    status = run_worker(prog, cfg, model_cfg, quiet=args.quiet, under_torchrun=under_torchrun)
    if under_torchrun:  # done and written: no interpreter teardown (loom.train.worker_exit)
        from loom.train.worker_exit import leave

        leave(status)
    return status


def run_worker(prog: str, cfg, model_cfg, quiet: bool, under_torchrun: bool) -> int:
    """Train in this process (one process, or one torchrun worker); the exit status."""
    from loom.data.dataset import DataError
    from loom.train.checkpoint_files import CheckpointError
    from loom.train.hangs import Activity
    from loom.train.signals import EXIT_STOPPED, StoppedBySignal
    from loom.train.report import format_summary
    from loom.train.trainer import Trainer

    # Every rank meets the same error (the checks agree across ranks): rank 0 says it once.
    def worker_fail(message: str) -> int:
        return fail(prog, message) if os.environ.get("RANK", "0") == "0" else 2

    try:
        # A worker of a torchrun started by hand first opens the data here; every worker reads
        # its share of the checkpoint's checksums here.
        trainer = Trainer(cfg, model_cfg, progress=not quiet)
    except (DataError, CheckpointError) as e:
        return worker_fail(str(e))
    except Exception as e:  # noqa: BLE001 - unexpected: one line, the traceback in a file
        return crashed(prog, e, cfg, under_torchrun, Activity())
    outcome = None
    try:
        with trainer.stop_requests:  # SIGTERM / SIGINT: stop after this step, with a checkpoint
            summary = trainer.train()
    except (FloatingPointError, CheckpointError) as e:
        outcome = worker_fail(str(e))
    except StoppedBySignal as e:
        if trainer.rank == 0:
            print(f"{prog}: {e}", file=sys.stderr)
        outcome = EXIT_STOPPED
    except Exception as e:  # noqa: BLE001 - unexpected, maybe on this rank alone: no barrier
        trainer.close(together=False)
        return crashed(prog, e, cfg, under_torchrun, trainer.activity)
    trainer.close()
    if outcome is not None:
        return outcome
    if trainer.rank == 0:
        print(format_summary(summary, cfg.metrics.jsonl, cfg.metrics.plot))
    return 0


def crashed(prog: str, error: BaseException, cfg, under_torchrun: bool, activity) -> int:
    """An unexpected exception: a collective that passed train.timeout_s (another rank stopped
    answering), or a bug with its traceback written to a file in the run's folder. One line, said
    by this process alone, or under torchrun by whoever reports the job's first failure."""
    from pathlib import Path

    from loom.train.crash import EXIT_CRASH, record_crash, tell_torchrun
    from loom.train.hangs import EXIT_TIMEOUT, collective_timeout, timeout_line

    rank = int(os.environ.get("RANK", "0"))
    backend_words = collective_timeout(error)
    if backend_words is not None:
        line, status = timeout_line(rank, cfg.train.timeout_s, activity, error, backend_words), EXIT_TIMEOUT
        tell_torchrun(line, error)
    else:
        line, status = record_crash(error, Path(cfg.metrics.jsonl).parent, rank), EXIT_CRASH
    if not under_torchrun:  # else the line is in torchrun's error file
        print(f"{prog}: {line}", file=sys.stderr)
    return status


def cmd_dry_run(args: argparse.Namespace, overrides: list[str]) -> int:
    from loom.config import ConfigError, load_config, validate
    from loom.train.dry_run import dry_run, format_dry_run

    prog = "loom train --dry-run"
    if not args.dry_run:
        return fail("loom train", f"--world={args.world} needs --dry-run; allowed without it: --nproc")
    for flag, value in (("--nproc", args.nproc), ("--max-restarts", args.max_restarts or None)):
        if value is not None:
            return fail(prog, f"{flag}={value} starts processes; a dry run starts none (--world N sets its size)")
    if "WORLD_SIZE" in os.environ:
        return fail(prog, "under torchrun: a dry run is one process; run it without torchrun")
    if args.world is not None and args.world < 1:
        return fail(prog, f"--world={args.world} must be a positive integer")
    try:
        cfg = load_config(args.config, overrides)
        model_cfg = validate(cfg, world_size=args.world, check_files=False)
    except ConfigError as e:
        return fail(prog, str(e))
    try:
        report = dry_run(cfg, model_cfg, args.world)
    except RuntimeError as e:
        return fail(prog, str(e))
    print(format_dry_run(report, cfg, model_cfg))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from loom.data.prepare import kept_after_stop

    if args.verify:
        return cmd_verify(args.verify)
    missing = [f"--{k}" for k in ("input", "tokenizer", "output") if getattr(args, k) is None]
    if missing:
        return fail("loom prepare", f"{', '.join(missing)} needed (or --verify DATASET to check a prepared one)")
    if args.format == "sft":  # written into an atomic folder: an interrupt leaves nothing
        return stoppable("loom prepare", lambda: prepare_sft_command(args), lambda: "nothing was written")
    return stoppable("loom prepare", lambda: prepare_tokens_command(args),
                     lambda: kept_after_stop(args.output))


def stoppable(prog: str, command, kept) -> int:
    """Run a tool's command so that SIGINT or SIGTERM ends it with one line saying what was
    kept (`kept()`), and exit status 128 + the signal (130, 143), without a traceback."""
    import signal

    class Stopped(BaseException):
        pass

    def on_signal(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        return command()
    except (KeyboardInterrupt, Stopped) as e:
        signum = e.args[0] if isinstance(e, Stopped) else signal.SIGINT
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal while the line is written
        print(f"{prog}: stopped by {signal.Signals(signum).name}; {kept()}", file=sys.stderr)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare_tokens_command(args: argparse.Namespace) -> int:
    """`loom prepare` of documents; prints the counts."""
    from loom.data.prepare import PrepareError, prepare

    try:
        meta = prepare(args.input, args.tokenizer, args.output, args.val_fraction, progress=not args.quiet,
                       text_key=args.text_key, eos_token=args.eos_token, bos_token=args.bos_token,
                       workers=args.workers, output_format=args.output_format)
    except PrepareError as e:
        return fail("loom prepare", str(e))
    sp = meta["splits"]
    bos = "" if meta.get("bos_id") is None else f", each document opened by token {meta['bos_id']}"
    if args.output_format == "megatron":
        print(f"wrote {args.output}.bin and {args.output}.idx: {sp['train']['tokens']:,} tokens in "
              f"{sp['train']['documents']:,} documents, vocabulary {meta['vocab_size']:,}{bos}")
        return 0
    print(f"wrote {args.output}: train {sp['train']['tokens']:,} tokens in {sp['train']['documents']:,} "
          f"documents, validation {sp['val']['tokens']:,} tokens in {sp['val']['documents']:,} documents, "
          f"vocabulary {meta['vocab_size']:,}{bos}")
    return 0


def prepare_sft_command(args: argparse.Namespace) -> int:
    """`loom prepare --format sft`: examples and loss masks; prints the counts."""
    from loom.data.prepare import PrepareError
    from loom.data.sft import prepare_sft

    try:
        meta = prepare_sft(args.input, args.tokenizer, args.output, args.seq_len, args.val_fraction,
                           args.on_long, args.train_on_all)
    except PrepareError as e:
        return fail("loom prepare", str(e))
    sp = meta["splits"]
    counts = ", ".join(f"{name} {sp[s]['examples']:,} examples ({sp[s]['tokens']:,} tokens, "
                       f"{sp[s]['answer_tokens']:,} carrying loss, longest {sp[s]['max_example']:,})"
                       for s, name in (("train", "train"), ("val", "validation")))
    print(f"wrote {args.output}: {counts}; {meta['truncated']} truncated, {meta['dropped']} dropped "
          f"(no answer left after truncation); vocabulary {meta['vocab_size']:,}; messages formatted by "
          f"{'the chat template of ' + meta['chat_template'] if meta['chat_template'] != 'plain' else 'the plain template'}")
    return 0


def cmd_verify(folder: str) -> int:
    """`loom prepare --verify DATASET`: sizes, checksums and largest token ids of a prepared dataset."""
    from pathlib import Path

    from loom.data.batch import read_meta
    from loom.data.integrity import IntegrityError, verify

    path = Path(folder)
    if not (path / "meta.json").is_file():
        return fail("loom prepare", f"--verify={folder!r} is not a prepared dataset (no meta.json)")
    meta = read_meta(path)
    try:
        largest = verify(path, meta)
    except IntegrityError as e:
        return fail("loom prepare", str(e))
    files = meta.get("files", {})
    print(f"verified {folder}: {len(files)} files, sizes and checksums as prepared" if files else
          f"verified {folder}: sizes as prepared (a dataset from before checksums were recorded)")
    print("largest token id: " + ", ".join(f"{split} {top:,}" for split, top in largest.items())
          + f" (vocabulary {meta['vocab_size']:,})")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from loom.metrics.flops import CONVENTIONS, flops_per_token, param_counts
    from loom.models.registry import UnknownModelError, get_model_config

    prog = "loom flops"
    try:
        cfg = get_model_config(args.model)
    except UnknownModelError as e:
        return fail(prog, str(e).replace("model.name=", "--model="))
    if args.seq_len <= 0:
        return fail(prog, f"--seq-len={args.seq_len} must be a positive integer")
    counts = param_counts(cfg)
    params = counts.total
    fpt = {c: flops_per_token(cfg, args.seq_len, c) for c in CONVENTIONS}
    if args.json:
        out = {"model": args.model, "family": cfg.family, "params": params, "seq_len": args.seq_len,
               "flops_per_token": fpt}
        if cfg.moe_experts:
            out["active_params"] = counts.active
        print(json.dumps(out))
        return 0
    print(f"model            {args.model} ({cfg.family} family, {'causal' if cfg.causal else 'bidirectional'})")
    print(f"parameters       {params:,}")
    if cfg.moe_experts:
        print(f"active per token {counts.active:,} ({cfg.moe_top_k} of {cfg.moe_experts} experts; FLOPs count these)")
    print(f"sequence length  {args.seq_len:,}")
    for c in CONVENTIONS:
        print(f"FLOPs/token      {fpt[c]:.6e}  ({c} convention, forward + backward)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from loom.convert import export_hf, import_hf, model_config_overrides
    from loom.models.hf import HFFormatError
    from loom.train.checkpoint_files import CheckpointError

    prog = "loom convert"
    try:
        if args.from_hf:
            path, cfg = import_hf(args.from_hf, args.output)
            name, overrides = model_config_overrides(cfg)
            print(f"wrote loom checkpoint {path} (weights only, {sum(1 for _ in path.rglob('*.distcp'))} file(s))")
            print("train from it (any layout) with:")
            print("  loom train --model.name=" + " ".join([name, *overrides]) + f" --checkpoint.resume={path}")
        elif args.from_peft:
            from loom.peft import import_peft

            if not args.base:
                return fail(prog, "--from-peft needs --base, the loom checkpoint of the adapters' base model "
                                  "(`loom convert --from-hf` of it)")
            path, lora = import_peft(args.from_peft, args.base, args.output)
            print(f"wrote loom LoRA checkpoint {path} (adapters only, base {args.base})")
            print("continue training them with: loom train ... " + " ".join(f"--lora.{k}={v}" for k, v in lora.items())
                  + f" --checkpoint.resume={path}")
        elif args.peft:
            from loom.peft import export_peft

            folder = export_peft(args.to_hf, args.output, args.dtype)
            print(f"wrote PEFT adapter folder {folder} (adapter_config.json, adapter_model.safetensors, {args.dtype})")
        else:
            folder, files = export_hf(args.to_hf, args.output, args.dtype, int(args.max_shard_gb * 1024**3))
            print(f"wrote Hugging Face folder {folder}: config.json and {len(files)} safetensors file(s), {args.dtype}")
    except (HFFormatError, CheckpointError) as e:
        return fail(prog, str(e))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from loom.plan.hardware import GIB, PlanError, get_spec
    from loom.plan.search import plan, resolve_model

    prog = "loom plan"
    try:
        cfg = resolve_model(args.model)
        spec = get_spec(args.gpu, {"memory_gb": args.gpu_memory_gb, "intra_node_gbps": args.intra_node_gbps,
                                   "inter_node_gbps": args.inter_node_gbps, "gpus_per_node": args.gpus_per_node,
                                   "peak_tflops": args.peak_tflops})
        rows = plan(cfg, args.gpus, spec, args.seq_len, args.global_batch, args.dtype, args.tp, args.cp, args.pp,
                    args.micro_batch, args.recompute, args.zero, args.ep)
    except PlanError as e:
        return fail(prog, str(e))
    shown = rows if (args.tp and args.cp and args.pp and args.micro_batch) else rows[: args.top]
    if args.json:
        print(json.dumps([r.as_json() for r in shown]))
        return 0
    fitting = sum(r.fits for r in rows)
    print(f"{args.model} on {args.gpus} x {spec.name} ({spec.description}); seq {args.seq_len:,}, global batch "
          f"{args.global_batch} sequences, {args.dtype}; {len(rows)} layouts, {fitting} fit; "
          f"model TFLOP/s in the megatron convention")
    moe = bool(cfg.moe_experts)  # the EP column, for models that have experts
    head = ["#", "TP", "CP", "PP", "DP", *(["EP"] if moe else []), "MB", "recompute", "zero", "memory GB", "fits",
            "tokens/s/dev", "TFLOP/s/dev", "MFU"]
    table = []
    for i, r in enumerate(shown, 1):
        lay = r.layout
        table.append([str(i), str(lay.tp), str(lay.cp), str(lay.pp), str(lay.dp), *([str(lay.ep)] if moe else []),
                      str(lay.micro_batch), lay.recompute,
                      str(lay.zero), f"{r.memory.total / GIB:.1f}", "yes" if r.fits else "OOM", f"{r.perf.tokens_per_s_per_device:,.0f}",
                      f"{r.perf.tflops_per_device:.{1 if r.perf.tflops_per_device >= 10 else 4}f}",
                      f"{100 * r.perf.mfu:.1f}%"])
    widths = [max(len(x) for x in col) for col in zip(head, *table)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for line in table:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths)))
    if len(rows) > len(shown):
        print(f"({len(rows) - len(shown)} more; --top N shows more)")
    if args.explain:
        for i, r in enumerate(shown, 1):
            lay = r.layout
            print(f"\n#{i} TP={lay.tp} CP={lay.cp} PP={lay.pp} DP={lay.dp}{f' EP={lay.ep}' if moe else ''} "
                  f"MB={lay.micro_batch} "
                  f"recompute={lay.recompute} zero={lay.zero}: {lay.n_micro} micro-batches per step")
            print("  memory per device" + " " * 20 + "GiB")
            for name, v in r.memory.rows():
                print(f"    {name:<36}{v / GIB:8.2f}")
            print("  step time" + " " * 28 + "ms")
            for name, v in r.time.rows():
                print(f"    {name:<36}{1000 * v:8.1f}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from loom.bench.grid import GridError, load_grid

    prog = "loom bench"
    try:
        grid = load_grid(args.grid)
    except GridError as e:
        return fail(prog, str(e))
    if args.timeout <= 0:
        return fail(prog, f"--timeout={args.timeout} must be positive (seconds per layout)")
    if args.repeats < 1:
        return fail(prog, f"--repeats={args.repeats} must be a positive integer")
    from loom.bench.report import markdown_tables, plot_cp_speedup, plot_throughput, write_csv
    from loom.bench.runner import run_grid

    out = Path(args.out or f"runs/bench/{grid.name}")
    if args.compare_only:
        from loom.bench.report import read_csv

        if not (out / "results.csv").is_file():
            return fail(prog, f"--compare-only needs {out / 'results.csv'} from an earlier sweep (--out)")
        results = read_csv(out / "results.csv")
        args.compare_plan = True
    else:
        out.mkdir(parents=True, exist_ok=True)
        results = run_grid(grid, out, args.timeout, progress=not args.quiet, repeats=args.repeats)
        write_csv(results, out / "results.csv")
    title = f"loom bench {grid.name}"
    table = markdown_tables(results, title)
    (out / "results.md").write_text(table + "\n")
    plot_throughput(results, out / "throughput.png", title)
    has_cp = plot_cp_speedup(results, out / "cp_speedup.png", f"{grid.name}: speedup of cp")
    print(table)
    print(f"wrote {out}/results.csv, results.md, throughput.png" + (", cp_speedup.png" if has_cp else ""))
    if args.compare_plan:
        from loom.bench.compare import compare_with_plan

        text, _ = compare_with_plan(grid, results)
        (out / "compare_plan.md").write_text(text + "\n")
        print(text)
    return 0


def add_train_command(sub) -> None:
    """`loom train`'s arguments."""
    train = sub.add_parser(
        "train",
        help="train a model (default: the embedded tiny demo on the Python stdlib)",
        description="Train a model. Any config key can be overridden with --section.key=value, "
                    "e.g. --train.steps=50 --model.name=small.",
    )
    train.add_argument("--config", help="a TOML config file (see configs/)")
    train.add_argument("--nproc", type=int, help="processes to start on this node (through torchrun); "
                       "default: as many as the layout needs")
    train.add_argument("--max-restarts", type=int, default=0,
                       help="with --nproc: restarts of the whole job after a worker fails (torchrun's)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--dry-run", action="store_true",
                       help="build the real layout for the whole world on a fake process group in this "
                            "process, allocating nothing, and print the memory of each kind of rank")
    train.add_argument("--world", type=int, help="with --dry-run: ranks of the job (default: the layout's size)")


def add_prepare_command(sub) -> None:
    """`loom prepare`'s arguments."""
    prep = sub.add_parser("prepare", help="tokenize documents (.txt, .jsonl[.gz|.zst], .parquet) into a token dataset")
    prep.add_argument("--input", help="a folder (or file) of .txt, .jsonl, .jsonl.gz, .jsonl.zst and .parquet "
                                      "documents, or a `datasets` save_to_disk folder")
    prep.add_argument("--tokenizer", help="a Hugging Face tokenizer.json, or a model folder holding one")
    prep.add_argument("--output", help="the dataset folder to create (--output-format megatron: the prefix of "
                                       "PREFIX.bin and PREFIX.idx)")
    prep.add_argument("--output-format", default="loom", help="loom (a dataset folder) or megatron (.bin + .idx)")
    prep.add_argument("--text-key", default="text", help="the JSON field or parquet column holding the text")
    prep.add_argument("--eos-token", help="the token ending every document (default: the tokenizer's "
                                          "tokenizer_config.json, or a known end-of-text name)")
    prep.add_argument("--bos-token", help="a token starting every document (default: tokenizer_config.json's, "
                                          "where it adds one)")
    prep.add_argument("--workers", type=int, default=1, help="processes tokenizing shards of the input")
    prep.add_argument("--verify", metavar="DATASET",
                      help="check a prepared dataset instead: file sizes, checksums, largest token ids")
    prep.add_argument("--val-fraction", type=float, default=0.01, help="documents held out for validation")
    prep.add_argument("--format", choices=["tokens", "sft"], default="tokens",
                      help="tokens: documents for pretraining; sft: fine-tuning examples (JSONL: input/output or "
                           "messages) with their loss masks")
    prep.add_argument("--seq-len", type=int, default=2048, help="sft: the training sequence examples must fit")
    prep.add_argument("--on-long", default="refuse", help="sft: an example longer than --seq-len: refuse or truncate")
    prep.add_argument("--train-on-all", action="store_true",
                      help="sft: every token carries loss (default: only the answers)")
    prep.add_argument("--quiet", action="store_true")


def add_flops_command(sub) -> None:
    """`loom flops`'s arguments."""
    flops = sub.add_parser("flops", help="parameters and model FLOPs per token of a named model")
    flops.add_argument("--model", required=True)
    flops.add_argument("--seq-len", type=int, required=True)
    flops.add_argument("--json", action="store_true")


def add_convert_command(sub) -> None:
    """`loom convert`'s arguments."""
    conv = sub.add_parser("convert", help="import a Hugging Face Llama folder, or export a loom checkpoint to one",
                          description="Hugging Face Llama (config.json + safetensors) <-> loom checkpoint.")
    way = conv.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="a Hugging Face model folder to import")
    way.add_argument("--to-hf", metavar="CHECKPOINT", help="a loom checkpoint folder (step-...) to export (a LoRA "
                                                          "checkpoint: its base with the adapters merged)")
    way.add_argument("--from-peft", metavar="PEFT_DIR", help="a PEFT LoRA folder to import (with --base)")
    conv.add_argument("--peft", action="store_true", help="export: a LoRA checkpoint's adapters as a PEFT folder")
    conv.add_argument("--base", metavar="CHECKPOINT", help="--from-peft: the loom checkpoint of the base model")
    conv.add_argument("--output", required=True, help="the checkpoint (import) or folder (export) to create")
    conv.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                      help="export: dtype of the written weights (default bfloat16, as published)")
    conv.add_argument("--max-shard-gb", type=float, default=5.0, help="export: largest safetensors file")


def add_plan_command(sub) -> None:
    """`loom plan`'s arguments."""
    pl = sub.add_parser("plan", help="predict memory and throughput of layouts on a GPU cluster (or this CPU)",
                        description="Rank every valid layout by predicted tokens/s per device, or evaluate one "
                                    "(give --tp, --cp, --pp and --micro-batch).")
    pl.add_argument("--model", required=True)
    pl.add_argument("--gpus", type=int, required=True, help="devices in the job")
    pl.add_argument("--gpu", required=True, help="hardware spec: h100-sxm-80gb, h100-94gb, h200-141gb, a100-40gb, "
                                                 "a100-80gb, cpu (this machine, measured)")
    pl.add_argument("--seq-len", type=int, required=True)
    pl.add_argument("--global-batch", type=int, required=True, help="sequences per step")
    for flag in ("--tp", "--cp", "--pp", "--micro-batch"):
        pl.add_argument(flag, type=int)
    pl.add_argument("--ep", type=int, help="expert parallelism (MoE models; borrowed from DP x CP); default: searched")
    pl.add_argument("--recompute", choices=["none", "selective", "full"],
                    help="default: the fastest that fits, per layout")
    pl.add_argument("--zero", type=int, choices=[3, 1],
                    help="FSDP sharding mode (parallel.zero); default: the faster that fits, per layout")
    pl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "fp8", "float32"],
                    help="fp8: FP8 block GEMMs (train.fp8) at the FP8 peak, attention and the output layer in bf16")
    pl.add_argument("--top", type=int, default=20, help="rows shown when searching")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--explain", action="store_true", help="memory and time breakdown of each row shown")
    pl.add_argument("--gpu-memory-gb", type=float, help="override the spec's memory per device (GiB)")
    pl.add_argument("--intra-node-gbps", type=float, help="override: GB/s per device inside a node")
    pl.add_argument("--inter-node-gbps", type=float, help="override: GB/s per device across nodes")
    pl.add_argument("--gpus-per-node", type=int, help="override")
    pl.add_argument("--peak-tflops", type=float, help="override: dense TFLOP/s per device in --dtype")


def add_bench_command(sub) -> None:
    """`loom bench`'s arguments."""
    be = sub.add_parser("bench", help="sweep a grid of layouts on this machine through torchrun; tables and plots",
                        description="Run every layout of a grid file for a few steps each (loom train --nproc N) "
                                    "and write results.csv, results.md and PNG plots.")
    be.add_argument("--grid", required=True, help="a grid TOML file (see benchmarks/grids/)")
    be.add_argument("--out", help="output folder (default runs/bench/<grid name>)")
    be.add_argument("--timeout", type=float, default=600, help="seconds per layout before it is marked timeout")
    be.add_argument("--repeats", type=int, default=1,
                    help="runs per layout, round-robin; each cell is the run with the median step time")
    be.add_argument("--compare-plan", action="store_true",
                    help="also print measured against the planner's prediction (spec cpu) per layout")
    be.add_argument("--compare-only", action="store_true",
                    help="compare the sweep already in --out with the planner, without running it again")
    be.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="loom", description="Train Llama models at long context with 4D parallelism.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_train_command(sub)
    add_prepare_command(sub)
    add_flops_command(sub)
    add_convert_command(sub)
    add_plan_command(sub)
    add_bench_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        return cmd_train(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "prepare":
        return cmd_prepare(args)
    if args.command == "convert":
        return cmd_convert(args)
    if args.command == "plan":
        return cmd_plan(args)
    if args.command == "bench":
        return cmd_bench(args)
    return cmd_flops(args)


if __name__ == "__main__":
    sys.exit(main())
