"""LoRA: the base stays frozen bit for bit, the optimizer and checkpoints hold adapters only,
resumes are exact, and adapters travel to and from Hugging Face PEFT (logits within 1e-5).
Layout parity of LoRA runs is in test_parallel.py (lora_* cases)."""
import json

import pytest
import torch

from loom.cli import main

MODEL = ["--parallel.dp_shard=1", "--parallel.pp=1", "--model.dim=64", "--model.n_layers=2", "--model.n_heads=8",
         "--model.n_kv_heads=4", "--model.ffn_dim=128", "--model.vocab_size=300"]
TRAIN = ["--train.seq_len=32", "--train.global_batch=4", "--train.micro_batch=2", "--train.warmup_steps=0",
         "--train.lr=1e-2", "--train.eval_batches=1", "--metrics.plot=", "--quiet"]


def sft(sft_dataset, tmp_path, *extra):
    return ["train", *MODEL, *TRAIN, "--data.format=sft", f"--data.path={sft_dataset}",
            f"--metrics.jsonl={tmp_path}/m.jsonl", *extra]


@pytest.fixture(scope="module")
def base(sft_dataset, tmp_path_factory):
    """A full-parameter run's checkpoint: the base the LoRA runs start from."""
    tmp = tmp_path_factory.mktemp("base")
    assert main(sft(sft_dataset, tmp, "--train.steps=2", f"--checkpoint.dir={tmp}/ck")) == 0
    return tmp / "ck" / "step-00000002"


def test_base_stays_bit_identical_and_only_adapters_train(sft_dataset, base, tmp_path):
    from loom.config import load_config, validate
    from loom.train.checkpoint_files import checkpoint_tensor_shapes, load_model_tensors
    from loom.train.trainer import Trainer

    args = sft(sft_dataset, tmp_path, "--train.steps=3", "--lora.rank=4", f"--checkpoint.init_from={base}",
               f"--checkpoint.dir={tmp_path}/ck")[1:]
    cfg = load_config(None, [a for a in args if a != "--quiet"])
    trainer = Trainer(cfg, validate(cfg), progress=False)
    trainer.train()
    params = dict(trainer.model.named_parameters())
    adapters = {n for n in params if n.endswith((".lora_a", ".lora_b"))}
    assert len(adapters) == 2 * 7 * 2  # 7 projections x 2 blocks
    base_tensors = load_model_tensors(base, [n for n in params if n not in adapters], checkpoint_tensor_shapes(base))
    for name, want in base_tensors.items():
        assert torch.equal(params[name].detach(), want), name  # never moved
        assert not params[name].requires_grad
    assert all(params[n].abs().max() > 0 for n in adapters if n.endswith("lora_b"))  # B left zero
    state = trainer.engine.optimizers[0].state
    held = {id(p) for p in state}
    assert held == {id(params[n]) for n in adapters}  # AdamW keeps moments of adapters only
    saved = checkpoint_tensor_shapes(tmp_path / "ck" / "step-00000003")
    assert set(saved) == adapters
    manifest = json.loads((tmp_path / "ck" / "step-00000003" / "loom.json").read_text())
    assert manifest["lora"] == {"rank": 4, "alpha": 32.0, "targets": "q,k,v,o,gate,up,down", "base": str(base.resolve())}


def test_lora_resume_continues_exactly_and_needs_its_base(sft_dataset, base, tmp_path, capsys):
    import shutil

    runs = {}
    for name, stops in (("whole", []), ("stopped", ["--train.stop_at=2"])):
        folder = tmp_path / name
        for stop in [*stops, None]:
            extra = [stop] if stop else []
            assert main(sft(sft_dataset, folder, "--train.steps=4", "--lora.rank=4", f"--checkpoint.init_from={base}",
                            f"--checkpoint.dir={folder}/ck", "--checkpoint.every=2", "--metrics.log_every=1", *extra)) == 0
        runs[name] = [json.loads(line)["loss"] for line in open(folder / "m.jsonl")]
    assert runs["stopped"] == runs["whole"] and len(runs["whole"]) == 4

    moved = tmp_path / "moved_base"
    shutil.copytree(base, moved)
    capsys.readouterr()
    shutil.rmtree(base)
    try:
        code = main(sft(sft_dataset, tmp_path / "whole", "--train.steps=6", "--lora.rank=4",
                        f"--checkpoint.dir={tmp_path}/whole/ck"))
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "holds LoRA adapters of the base" in err, err
    finally:
        shutil.copytree(moved, base)


def test_base_held_in_bf16_changes_no_number(sft_dataset, base, tmp_path):
    """lora.base_dtype='bfloat16' under bf16 autocast: the same losses bit for bit (autocast rounds
    the fp32 base so before every product), with the blocks' projections stored in bf16."""
    from loom.config import load_config, validate
    from loom.train.trainer import Trainer

    losses = {}
    for dtype in ("float32", "bfloat16"):
        args = sft(sft_dataset, tmp_path / dtype, "--train.steps=3", "--lora.rank=4", "--train.dtype=bfloat16",
                   f"--lora.base_dtype={dtype}", f"--checkpoint.init_from={base}")[1:]
        cfg = load_config(None, [a for a in args if a != "--quiet"])
        trainer = Trainer(cfg, validate(cfg), progress=False)
        losses[dtype] = [trainer.engine.train_step(trainer.data.micro_batches(step), 1e-2)[0] for step in range(3)]
        held = {n: p.dtype for n, p in trainer.model.named_parameters()}
    assert losses["bfloat16"] == losses["float32"]
    assert held["layers.0.attention.wq.weight"] == torch.bfloat16 and held["layers.0.attention.wq.lora_a"] == torch.float32
    assert held["tok_embeddings.weight"] == held["layers.0.attention_norm.weight"] == torch.float32


@pytest.mark.parametrize("extra, words", [
    (["--lora.rank=0", "--lora.alpha=8"], ["lora.rank=0", "lora.alpha=8.0"]),
    (["--lora.rank=-1"], ["lora.rank=-1", "positive"]),
    (["--lora.rank=4", "--lora.targets=q,x"], ["lora.targets='q,x'", "allowed", "gate"]),
    (["--lora.rank=4", "--lora.dropout=1.0"], ["lora.dropout=1.0"]),
    (["--lora.rank=4", "--model.name=tiny-gpt3", "--lora.targets=gate"], ["gate", "allowed: 'all'"]),
    (["--lora.rank=4", "--train.dtype=bfloat16", "--train.fp8=tensorwise"], ["train.fp8", "LoRA"]),
    (["--lora.rank=4", "--lora.base_dtype=bfloat16"], ["lora.base_dtype='bfloat16'", "train.dtype='bfloat16'"]),
    (["--lora.rank=4", "CK_OF_BASE"], ["holds checkpoints of a whole model", "checkpoint.init_from="]),
])
def test_bad_lora_settings_are_one_line(sft_dataset, base, tmp_path, capsys, extra, words):
    extra = [f"--checkpoint.dir={base.parent}" if a == "CK_OF_BASE" else a for a in extra]
    assert main(sft(sft_dataset, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "m.jsonl").exists()


def _loom_lora_model(checkpoint):
    """A single-process loom model with a LoRA checkpoint's base and adapters."""
    from loom.models.lora import LoRASpec, apply_lora
    from loom.models.transformer import build_model
    from loom.peft import read_adapters
    from loom.train.checkpoint_files import checkpoint_tensor_shapes, load_model_tensors, saved_model_config

    manifest = json.loads((checkpoint / "loom.json").read_text())
    cfg, lora = saved_model_config(manifest), manifest["lora"]
    model = build_model(cfg, "cpu")
    apply_lora(model, LoRASpec(lora["rank"], lora["alpha"], 0.0, tuple(lora["targets"].split(","))))
    shapes = checkpoint_tensor_shapes(lora["base"])
    state = {**load_model_tensors(lora["base"], list(shapes), shapes), **read_adapters(checkpoint)}
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_peft_export_import_and_merged_export(sft_dataset, tmp_path, capsys):
    """HF Llama (random weights) -> loom -> LoRA-trained a few steps -> PEFT adapters that peft
    loads onto the HF model: loom's logits within 1e-5; the merged export gives them without
    peft; the PEFT folder imports back to the same adapters and trains on."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from test_hf_convert import _hf_model

    from loom.peft import read_adapters

    hf = _hf_model(transformers)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")]) == 0
    model_args = capsys.readouterr().out.strip().splitlines()[-1].split()[2:-1]
    run = ["train", *model_args, *MODEL[:2], *TRAIN, "--data.format=sft", f"--data.path={sft_dataset}",
           f"--metrics.jsonl={tmp_path}/m.jsonl", "--train.steps=3", "--lora.rank=4", "--lora.alpha=8",
           "--lora.targets=q,v,down", f"--checkpoint.resume={tmp_path / 'imported'}", f"--checkpoint.dir={tmp_path}/ck"]
    assert main(run) == 0
    trained = tmp_path / "ck" / "step-00000003"
    ours = _loom_lora_model(trained)
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        want = ours(tokens)
        assert (want - hf(tokens).logits).abs().max() > 1e-3  # the adapters changed the model

    assert main(["convert", "--to-hf", str(trained), "--output", str(tmp_path / "adapter"), "--peft",
                 "--dtype", "float32"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["target_modules"] == [
        "mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    with_peft = peft.PeftModel.from_pretrained(_hf_model(transformers), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_peft(tokens).logits, want, rtol=1e-5, atol=1e-5)

    assert main(["convert", "--to-hf", str(trained), "--output", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, want, rtol=1e-5, atol=1e-5)

    assert main(["convert", "--from-peft", str(tmp_path / "adapter"), "--base", str(tmp_path / "imported"),
                 "--output", str(tmp_path / "back")]) == 0
    assert "--lora.targets=q,v,down" in capsys.readouterr().out
    back, saved = read_adapters(tmp_path / "back"), read_adapters(trained)
    assert back.keys() == saved.keys() and all(torch.equal(back[k], saved[k]) for k in saved)
    resumed = [a for a in run if not a.startswith(("--checkpoint.", "--train.steps"))]
    assert main([*resumed, "--train.steps=1", f"--checkpoint.resume={tmp_path / 'back'}"]) == 0
