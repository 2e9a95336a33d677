import json

import numpy as np
import pytest

from loom.cli import main
from loom.data.dataset import BatchSchedule, TokenDataset, read_meta
from loom.data.prepare import PrepareError, prepare


def test_prepare_writes_documents_with_boundaries(text_corpus, tmp_path):
    from tokenizers import Tokenizer

    root, tok_path, docs = text_corpus
    out = tmp_path / "ds"
    meta = prepare(root, tok_path, out, val_fraction=0.2, progress=False)
    assert read_meta(out) == meta
    sp = meta["splits"]
    assert sp["train"]["documents"] + sp["val"]["documents"] == len(docs)
    assert 0 < sp["val"]["documents"] < len(docs) // 2
    tok = Tokenizer.from_file(str(tok_path))
    eos = meta["eos_id"]
    texts = set(docs)
    for split in ("train", "val"):
        tokens = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])
        starts = np.load(out / f"{split}.docs.npy")
        assert len(tokens) == sp[split]["tokens"] and starts[0] == 0
        ends = list(starts[1:]) + [len(tokens)]
        for s, e in zip(starts, ends):
            assert tokens[e - 1] == eos  # every document ends with EOS, and only there
            assert eos not in tokens[s : e - 1]
            assert tok.decode(tokens[s : e - 1].tolist()) in texts


def test_prepare_is_atomic_and_refuses_bad_input(text_corpus, tmp_path, capsys):
    root, tok_path, _ = text_corpus
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("fine")
    (bad / "x.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(PrepareError, match=r"x.jsonl:2"):
        prepare(bad, tok_path, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no half-written output
    assert main(["prepare", "--input", str(root), "--tokenizer", str(tmp_path / "none.json"),
                 "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--tokenizer=" in err
    out = tmp_path / "ds"
    assert main(["prepare", "--input", str(root), "--tokenizer", str(tok_path), "--output", str(out), "--quiet"]) == 0
    before = (out / "train.bin").read_bytes()
    assert main(["prepare", "--input", str(root), "--tokenizer", str(tok_path), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "train.bin").read_bytes() == before  # nothing overwritten


def test_batches_are_deterministic_for_a_seed(text_corpus, tmp_path):
    root, tok_path, _ = text_corpus
    prepare(root, tok_path, tmp_path / "ds", val_fraction=0.1, progress=False)
    data = TokenDataset(tmp_path / "ds", "train", seq_len=16)
    a, b, c = (BatchSchedule(data.n_sequences, 4, seed) for seed in (7, 7, 8))
    steps = range(3 * data.n_sequences // 4)  # several epochs
    seq_a = [a.global_indices(s) for s in steps]
    assert all(np.array_equal(x, b.global_indices(s)) for s, x in zip(steps, seq_a))
    assert any(not np.array_equal(x, c.global_indices(s)) for s, x in zip(steps, seq_a))
    # Each epoch visits every sequence once; a later step is reproducible on its own.
    first_epoch = np.concatenate(seq_a)[: data.n_sequences]
    assert sorted(first_epoch) == list(range(data.n_sequences))
    fresh = BatchSchedule(data.n_sequences, 4, 7)
    assert np.array_equal(fresh.global_indices(steps[-1]), seq_a[-1])
    # Data-parallel ranks get disjoint slices that tile the global batch.
    parts = [a.rank_indices(5, r, 2) for r in range(2)]
    assert np.array_equal(np.concatenate(parts), a.global_indices(5))
    inputs, labels = data.sequences(a.global_indices(0))
    assert inputs.shape == labels.shape == (4, 16)
    assert np.array_equal(inputs[:, 1:], labels[:, :-1])
    tokens = np.fromfile(tmp_path / "ds" / "train.bin", dtype=read_meta(tmp_path / "ds")["dtype"])
    i = int(a.global_indices(0)[0])
    assert inputs[0].tolist() == tokens[i * 16 : i * 16 + 16].tolist()


def test_builtin_corpus_is_the_stdlib(tmp_path, monkeypatch):
    """The builtin dataset: stdlib files, held-out split, cached and reused."""
    from loom.data import stdlib

    files = stdlib.stdlib_files()[1]
    assert len(files) > 100 and all(p.suffix == ".py" for p in files)
    assert not any("site-packages" in p.parts for p in files)
    monkeypatch.setattr(stdlib, "stdlib_files", lambda: (files[0].parent, files[:30]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = stdlib.builtin_dataset(progress=False)
    meta = read_meta(path)
    assert meta["vocab_size"] <= stdlib.BUILTIN_VOCAB_SIZE and meta["splits"]["train"]["tokens"] > 10000
    assert json.loads((path / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    stamp = (path / "meta.json").stat().st_mtime_ns
    assert stdlib.builtin_dataset(progress=False) == path
    assert (path / "meta.json").stat().st_mtime_ns == stamp  # cached, not rebuilt
