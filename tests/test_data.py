import json

import numpy as np
import pytest

from loom.cli import main
from loom.data.batch import read_meta
from loom.data.dataset import BatchSchedule, EpochOrder, TokenDataset
from loom.data.prepare import PrepareError, prepare

SHARD = "shards/00000/"  # the one shard of the small test corpus


def split_tokens(folder, split: str):
    """(tokens [T], document starts [D]) of a prepared dataset's split, over all its shards."""
    from loom.data.dataset import open_stream

    stream, _ = open_stream(folder, split)
    starts = np.concatenate([np.asarray(span.starts) + off for span, off in zip(stream.spans, stream.offsets)])
    return stream.read(0, len(stream)), starts

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
        tokens, starts = split_tokens(out, split)
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
    before = split_tokens(out, "train")[0].tobytes()
    assert main(["prepare", "--input", str(root), "--tokenizer", str(tok_path), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert split_tokens(out, "train")[0].tobytes() == before  # nothing overwritten


def test_batches_are_deterministic_for_a_seed(text_corpus, tmp_path):
    root, tok_path, _ = text_corpus
    prepare(root, tok_path, tmp_path / "ds", val_fraction=0.1, progress=False)
    data = TokenDataset(tmp_path / "ds", "train", seq_len=16)
    a, b, c = (BatchSchedule(EpochOrder(data.n_sequences, seed), 4) for seed in (7, 7, 8))
    steps = range(3 * data.n_sequences // 4)  # several epochs
    seq_a = [a.global_indices(s) for s in steps]
    assert all(np.array_equal(x, b.global_indices(s)) for s, x in zip(steps, seq_a))
    assert any(not np.array_equal(x, c.global_indices(s)) for s, x in zip(steps, seq_a))
    # Each epoch visits every sequence once; a later step is reproducible on its own.
    first_epoch = np.concatenate(seq_a)[: data.n_sequences]
    assert sorted(first_epoch) == list(range(data.n_sequences))
    fresh = BatchSchedule(EpochOrder(data.n_sequences, 7), 4)
    assert np.array_equal(fresh.global_indices(steps[-1]), seq_a[-1])
    # Data-parallel ranks get disjoint slices that tile the global batch.
    parts = [a.rank_indices(5, r, 2) for r in range(2)]
    assert np.array_equal(np.concatenate(parts), a.global_indices(5))
    inputs, labels = data.sequences(a.global_indices(0))
    assert inputs.shape == labels.shape == (4, 16)
    assert np.array_equal(inputs[:, 1:], labels[:, :-1])
    tokens = split_tokens(tmp_path / "ds", "train")[0]
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


def _copy(dataset, tmp_path):
    import shutil

    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    return out


def _validate(path, *extra):
    from loom.config import load_config, validate

    return validate(load_config(None, ["--model.name=tiny", "--model.vocab_size=300", "--parallel.dp_shard=1",
                                       "--parallel.pp=1", "--train.seq_len=32", f"--data.path={path}", *extra]))


def test_prepare_records_sizes_checksums_and_largest_tokens(dataset):
    meta = read_meta(dataset)
    assert set(meta["files"]) == {SHARD + f for f in ("train.bin", "val.bin", "train.docs.npy", "val.docs.npy")}
    tokens = np.fromfile(dataset / SHARD / "train.bin", dtype=meta["dtype"])
    assert meta["splits"]["train"]["max_token"] == int(tokens.max())
    assert meta["files"][SHARD + "train.bin"]["bytes"] == tokens.nbytes


def test_damaged_datasets_are_refused_in_one_line_before_a_run(dataset, tmp_path, monkeypatch, capsys):
    """Truncated, changed in place, or holding ids beyond the model's vocabulary: one line naming
    the file, before anything starts; the dataset is left as it was. Checksums are read on a
    dataset's first use on this machine (here: a fresh cache), not again while it is unchanged."""
    from loom.config import ConfigError
    from loom.data import integrity
    from loom.files import file_record

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good = _copy(dataset, tmp_path / "good")
    verified = []
    monkeypatch.setattr(integrity, "verify", lambda path, meta, _v=integrity.verify: verified.append(path) or _v(path, meta))
    _validate(good)
    _validate(good)
    assert verified == [good]  # read once, then remembered

    truncated = _copy(dataset, tmp_path / "truncated")
    data = (truncated / SHARD / "train.bin").read_bytes()
    (truncated / SHARD / "train.bin").write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ConfigError, match=rf"train.bin is {len(data) * 6 // 10:,} bytes, but loom prepare wrote "
                                          rf"{len(data):,} \(truncated or replaced\)"):
        _validate(truncated)
    with pytest.raises(Exception, match="truncated or replaced"):  # and at open, for the builtin path's users
        TokenDataset(truncated, "train", 32)

    changed = _copy(dataset, tmp_path / "changed")
    tokens = np.fromfile(changed / SHARD / "val.bin", dtype=read_meta(changed)["dtype"])
    tokens[3] = (tokens[3] + 1) % 300
    tokens.tofile(changed / SHARD / "val.bin")
    with pytest.raises(ConfigError, match="val.bin does not match the checksum loom prepare recorded"):
        _validate(changed)
    assert main(["prepare", "--verify", str(changed)]) == 2
    assert capsys.readouterr().err.count("\n") == 1

    # Ids beyond the vocabulary in a file whose records agree (written by another tool).
    beyond = _copy(dataset, tmp_path / "beyond")
    meta = read_meta(beyond)
    tokens = np.fromfile(beyond / SHARD / "train.bin", dtype=meta["dtype"])
    tokens[7] = 400
    tokens.tofile(beyond / SHARD / "train.bin")
    meta["files"][SHARD + "train.bin"] = file_record(beyond / SHARD / "train.bin")
    meta["splits"]["train"]["max_token"] = 400
    (beyond / "meta.json").write_text(json.dumps(meta))
    before = {f: f.read_bytes() for f in beyond.rglob("*") if f.is_file()}
    with pytest.raises(ConfigError, match=r"its train split holds token id 400, beyond model.vocab_size=300"):
        _validate(beyond)
    assert {f: f.read_bytes() for f in beyond.rglob("*") if f.is_file()} == before
    assert main(["prepare", "--verify", str(good)]) == 0
    assert "sizes and checksums as prepared" in capsys.readouterr().out


def test_packed_documents_count_attention_per_document(dataset):
    """With data.pack_documents, attention FLOPs are counted per document: the attention length
    is the mean over windows of the squared lengths of the documents' pieces in each, over seq_len."""
    from loom.data.dataset import TokenDataset

    d = TokenDataset(dataset, "train", 32)
    per_window = []
    for i in range(d.n_sequences):
        documents = d.batch(np.array([i]), documents=True).documents[0].numpy()
        _, counts = np.unique(documents, return_counts=True)
        per_window.append((counts.astype(float) ** 2).sum())
    assert d.attention_len == pytest.approx(np.mean(per_window) / 32, rel=1e-12)
    assert 0 < d.attention_len < 32
