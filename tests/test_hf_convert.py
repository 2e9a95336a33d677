"""Hugging Face interchange of whole models: a round trip through `loom convert`, bf16 weights
and the refusals, and an import that streams one tensor at a time."""
import pytest
import torch

from runs import common


def _hf_model(transformers, dtype=torch.float32):
    cfg = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
        tie_word_embeddings=False, attention_bias=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm gains too, so a mixed-up name cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


def test_hugging_face_round_trip(tmp_path, capsys, dataset):
    """HF LlamaForCausalLM (random weights, local config) -> `loom convert --from-hf` -> loom logits
    equal HF's within 1e-5 -> trains from it -> `loom convert --to-hf` -> transformers loads the
    export and gives the loom model's logits."""
    transformers = pytest.importorskip("transformers")
    from loom.cli import main
    from loom.models.transformer import build_model
    from loom.train.checkpoint_files import load_model_weights

    hf = _hf_model(transformers)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "imported")]) == 0
    printed = capsys.readouterr().out
    command = printed.strip().splitlines()[-1].split()  # "loom train --model.name=... --checkpoint.resume=..."
    assert command[:3] == ["loom", "train", "--model.name=llama3.1-8b"]

    from loom.config import load_config, validate

    model_cfg = validate(load_config(None, command[2:-1] + [f"--data.path={dataset}"]))
    ours = build_model(model_cfg, "cpu")
    load_model_weights(tmp_path / "imported", ours)
    tokens = torch.randint(0, 300, (2, 48))
    with torch.no_grad():
        want = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), want, rtol=1e-5, atol=1e-5)

    # A run starts from the imported weights (step 0, fresh optimizer) and saves a training checkpoint.
    run = command[2:] + common(dataset, tmp_path, steps=2)[8:] + [
        "--parallel.dp_shard=1", "--parallel.pp=1", f"--checkpoint.dir={tmp_path}/run", "--train.lr=1e-4", "--train.min_lr=1e-5"]
    assert main(["train", "--quiet", *run]) == 0
    assert "resumed from" in capsys.readouterr().out

    for source, dtype, rel in ((tmp_path / "imported", "float32", 1e-5), (tmp_path / "run/step-00000002", "float32", 1e-5),
                               (tmp_path / "run/step-00000002", "bfloat16", 2e-2)):
        out = tmp_path / f"export_{source.name}_{dtype}"
        assert main(["convert", "--to-hf", str(source), "--output", str(out), "--dtype", dtype,
                     "--max-shard-gb", "0.0002"]) == 0  # ~200 KB: several shards and an index
        assert (out / "model.safetensors.index.json").exists()
        back = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        load_model_weights(source, ours)
        with torch.no_grad():
            torch.testing.assert_close(back(tokens).logits, ours(tokens), rtol=rel, atol=rel)
    capsys.readouterr()


def test_hugging_face_import_of_bf16_weights_and_refusals(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from loom.cli import main
    from loom.models.hf import hf_param_name
    from loom.models.transformer import build_model
    from loom.convert import import_hf

    hf = _hf_model(transformers, torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    path, cfg = import_hf(tmp_path / "hf", tmp_path / "ck")
    ours = build_model(cfg, "cpu")  # fp32 master weights take the bf16 values exactly
    from loom.train.checkpoint_files import load_model_weights

    load_model_weights(path, ours)
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, hf_params[hf_param_name(name, cfg)].float()), name

    (tmp_path / "pickled").mkdir()
    torch.save({}, tmp_path / "pickled" / "pytorch_model.bin")
    (tmp_path / "pickled" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    cases = [
        (["--from-hf", str(tmp_path / "pickled"), "--output", str(tmp_path / "x")], "never unpickles"),
        (["--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ck")], "already exists"),
        (["--from-hf", str(tmp_path / "nope"), "--output", str(tmp_path / "y")], "no config.json"),
        (["--to-hf", str(tmp_path / "ck"), "--output", str(tmp_path / "hf")], "is not empty"),
    ]
    capsys.readouterr()  # transformers' own progress bars
    for args, message in cases:
        assert main(["convert", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


_STREAMED_IMPORT = r"""
import json, resource, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from loom.convert import import_hf
from loom.models.hf import hf_param_name
from loom.models.hf.llama import LlamaAdapter
from loom.models.transformer import ModelConfig, build_model

folder, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = ModelConfig(dim=1024, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=4096, vocab_size=8192)
folder.mkdir()
(folder / "config.json").write_text(json.dumps(LlamaAdapter().hf_config(cfg, "bfloat16")))
weight_map, largest, total = {}, 0, 0
for i, (name, p) in enumerate(build_model(cfg, "meta").named_parameters()):  # one file per tensor
    t = torch.full(p.shape, float(i % 7), dtype=torch.bfloat16)
    save_file({hf_param_name(name, cfg): t}, str(folder / f"w{i:03d}.safetensors"))
    weight_map[hf_param_name(name, cfg)] = f"w{i:03d}.safetensors"
    largest, total = max(largest, t.nbytes), total + t.nbytes
    del t
(folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
import_hf(folder, out)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"grew": grew, "largest": largest, "total": total}))
"""


@pytest.mark.slow
def test_hugging_face_import_streams_one_tensor_at_a_time(tmp_path):
    """Importing a 302 MB (bf16) model grows the process by about its largest tensor (16 MB), not
    by the model; the checkpoint holds every tensor."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _STREAMED_IMPORT, str(tmp_path / "hf"), str(tmp_path / "ck")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    assert m["total"] > 15 * m["largest"]
    assert m["grew"] < 4 * m["largest"], m  # holding the model would grow by m["total"]
    from loom.train.checkpoint_files import checkpoint_tensor_shapes

    assert len(checkpoint_tensor_shapes(tmp_path / "ck")) == 8 * 9 + 3
