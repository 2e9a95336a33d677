import pytest
import torch

from loom.models.transformer import ModelConfig


def pytest_collection_modifyitems(items):
    """`fast` is every test not marked `slow` (a new test is fast until marked otherwise)."""
    for item in items:
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def micro_cfg() -> ModelConfig:
    """A model small enough for many steps in a test."""
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=97)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory):
    """A folder of .txt and .jsonl documents and a small BPE tokenizer trained on them."""
    import json

    from loom.data.stdlib import train_bpe

    root = tmp_path_factory.mktemp("corpus")
    docs = [f"def function_{i}(x):\n    return x * {i} + {i * i}  # number {i}\n" * (3 + i % 5) for i in range(60)]
    (root / "a").mkdir()
    for i, d in enumerate(docs[:40]):
        (root / "a" / f"doc{i:03d}.txt").write_text(d)
    with open(root / "more.jsonl", "w") as f:
        for d in docs[40:]:
            f.write(json.dumps({"text": d}) + "\n")
    tok = train_bpe(docs, vocab_size=300)
    tok_path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(tok_path))
    return root, tok_path, docs


@pytest.fixture(scope="session")
def dataset(text_corpus, tmp_path_factory):
    """The text corpus prepared as a loom dataset (20% of the documents held out)."""
    from loom.data.prepare import prepare

    root, tok_path, _ = text_corpus
    out = tmp_path_factory.mktemp("data") / "ds"
    prepare(root, tok_path, out, val_fraction=0.2, progress=False)
    return out


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float, floor: float = 0.0) -> None:
    """max |got - want| <= rel * max(max |want|, floor): the relative tolerance of our parity rule,
    measured against the tensor's scale so that entries near zero do not turn float noise into
    failures. floor: a scale below which a whole tensor counts as zero (a key projection's bias,
    whose gradient is exactly zero: softmax ignores a shift shared by all keys)."""
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), floor)
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:g} x max |want| {scale:.3e}"


@pytest.fixture(scope="session")
def sft_dataset(text_corpus, tmp_path_factory):
    """Fine-tuning examples of uneven prompt and answer lengths (so micro-batches and ranks hold
    different numbers of answer tokens), prepared with the corpus's tokenizer for seq_len 32."""
    import json

    from loom.data.sft import prepare_sft

    _, tok_path, _ = text_corpus
    root = tmp_path_factory.mktemp("sft")
    with open(root / "examples.jsonl", "w") as f:
        for i in range(120):
            record = {"input": f"function_{i} of x" + " x" * (i % 7),
                      "output": f"return x * {i}" + f" + {i * i}" * (i % 4)}
            f.write(json.dumps(record) + "\n")
    out = root / "sft"
    prepare_sft(root / "examples.jsonl", tok_path, out, seq_len=32, val_fraction=0.2, on_long="truncate")
    return out
