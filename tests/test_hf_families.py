"""Hugging Face interchange of every family with a Hugging Face architecture: a small random
model of transformers' class is saved, imported by `loom convert --from-hf`, run by loom with the
same logits (fp32, 1e-5), exported back by `loom convert --to-hf` and loaded by transformers with
the same logits again."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from loom.cli import main  # noqa: E402
from loom.train.checkpoint_files import load_model_weights  # noqa: E402


def _nemotron():
    return transformers.NemotronForCausalLM(transformers.NemotronConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=256, partial_rotary_factor=0.5, norm_eps=1e-5,
        tie_word_embeddings=False))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0))


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
        max_position_embeddings=128, type_vocab_size=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def _mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False))


def _randomize(model):
    """Every parameter away from its initial constant (norm gains of 1, zero biases), so that a
    parameter mapped to the wrong place cannot go unnoticed."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("family, make, expected_family", [
    ("nemotron", _nemotron, "nemotron"), ("gpt2", _gpt2, "gpt3"), ("bert", _bert, "bert"),
    ("mixtral", _mixtral, "mixtral")])
def test_round_trip_through_loom(family, make, expected_family, tmp_path, capsys):
    torch.manual_seed(0)
    hf = _randomize(make())
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ck")]) == 0
    command = capsys.readouterr().out.strip().splitlines()[-1].split()
    from loom.config import load_config, validate
    from loom.models.transformer import build_model

    model_cfg = validate(load_config(None, command[2:-1] + ["--train.seq_len=64"]), check_files=False)
    assert model_cfg.family == expected_family
    ours = build_model(model_cfg, "cpu").eval()
    load_model_weights(tmp_path / "ck", ours)
    tokens = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert main(["convert", "--to-hf", str(tmp_path / "ck"), "--output", str(tmp_path / "back"),
                 "--dtype", "float32"]) == 0
    back = type(hf).from_pretrained(tmp_path / "back", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, want, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
