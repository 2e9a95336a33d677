"""`loom prepare` on the formats users have (compressed JSONL, parquet, save_to_disk folders),
its tokens around documents, its workers and its resumption, and bad input in one line."""
import gzip
import json
import shutil

import numpy as np
import pytest

from loom.cli import main
from loom.data import inputs
from loom.data.prepare import PrepareError, prepare

DOCS = [f"record {i}: " + "lorem ipsum dolor sit amet, " * (1 + i % 7) + f"the end of {i}." for i in range(120)]


def split_tokens(folder, split: str):
    """(tokens [T], document starts [D]) of a prepared dataset's split, over all its shards."""
    from loom.data.dataset import open_stream

    stream, _ = open_stream(folder, split)
    starts = np.concatenate([np.asarray(span.starts) + off for span, off in zip(stream.spans, stream.offsets)])
    return stream.read(0, len(stream)), starts


def tree_bytes(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small BPE whose end-of-document token has a name loom does not guess (<|doc_end|>), with
    a BOS token <|doc_start|> that its post-processor adds, as Llama 3's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|doc_end|>", "<|doc_start|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(DOCS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|doc_start|> $A", special_tokens=[
        ("<|doc_start|>", tok.token_to_id("<|doc_start|>"))])
    folder = tmp_path_factory.mktemp("tokenizer")
    tok.save(str(folder / "tokenizer.json"))
    return folder


def write_formats(root, key="content"):
    """DOCS as .jsonl, .jsonl.gz, .jsonl.zst, parquet (several row groups) and a save_to_disk folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(DOCS)).encode()
    paths = {}
    for name, data in (("plain.jsonl", lines), ("gz.jsonl.gz", gzip.compress(lines)),
                       ("zst.jsonl.zst", zstandard.ZstdCompressor().compress(lines))):
        (root / name[:name.index(".")]).mkdir(parents=True)
        paths[name] = root / name[:name.index(".")] / name
        paths[name].write_bytes(data)
    (root / "parquet").mkdir()
    paths["parquet"] = root / "parquet" / "part-0.parquet"
    pq.write_table(pa.table({"id": list(range(len(DOCS))), key: DOCS}), paths["parquet"], row_group_size=25)
    return paths


def test_every_format_gives_the_same_tokens(tokenizer_dir, tmp_path):
    """The same documents as .jsonl, .jsonl.gz, .jsonl.zst, parquet and (where `datasets` is
    installed) a save_to_disk folder, with --text-key content: the same token stream, every
    document [bos] + text + eos, bos and eos from the tokenizer_config.json beside the tokenizer."""
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|doc_end|>", "bos_token": {"content": "<|doc_start|>"}, "add_bos_token": True}))
    paths = write_formats(tmp_path / "in")
    try:
        import datasets

        datasets.Dataset.from_dict({"content": DOCS}).save_to_disk(str(tmp_path / "in" / "hub"))
        paths["save_to_disk"] = tmp_path / "in" / "hub"
    except ImportError:
        pass
    streams = {}
    for name, path in paths.items():
        meta = prepare(path.parent if name != "save_to_disk" else path, tokenizer_dir, tmp_path / "out" / name,
                       val_fraction=0.0, progress=False, text_key="content")
        assert meta["splits"]["train"]["documents"] == len(DOCS), name
        streams[name] = split_tokens(tmp_path / "out" / name, "train")
    tokens, starts = streams["plain.jsonl"]
    for name, (t, s) in streams.items():
        assert np.array_equal(t, tokens) and np.array_equal(s, starts), name
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    bos, eos = tok.token_to_id("<|doc_start|>"), tok.token_to_id("<|doc_end|>")
    ends = [*starts[1:], len(tokens)]
    for doc, a, b in zip(DOCS, starts, ends):
        assert tokens[a] == bos and tokens[b - 1] == eos
        assert tok.decode(tokens[a + 1:b - 1].tolist()) == doc
    assert "save_to_disk" in streams or pytest.importorskip("datasets")


def test_special_tokens_from_flags_and_the_post_processor(tokenizer_dir, tmp_path, capsys):
    """Without a tokenizer_config.json: <|doc_end|> is no name loom guesses, so the tokenizer is
    refused in one line naming --eos-token; --eos-token names it; the BOS comes from
    --bos-token; a token the tokenizer lacks is one line listing its special tokens."""
    plain = tmp_path / "tok"
    plain.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", plain / "tokenizer.json")
    src = write_formats(tmp_path / "in")["plain.jsonl"]
    args = ["prepare", "--input", str(src), "--tokenizer", str(plain / "tokenizer.json"), "--text-key", "content",
            "--val-fraction", "0", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "name its own with --eos-token" in err
    assert main([*args, "--output", str(tmp_path / "b"), "--eos-token", "<|doc_end|>"]) == 0
    tokens, starts = split_tokens(tmp_path / "b", "train")
    assert tokens[starts[0]] != 1  # no BOS unless asked for
    assert main([*args, "--output", str(tmp_path / "c"), "--eos-token", "<|doc_end|>", "--bos-token", "<|doc_start|>"]) == 0
    tokens, starts = split_tokens(tmp_path / "c", "train")
    assert (tokens[starts] == 1).all() and (tokens[np.append(starts[1:], len(tokens)) - 1] == 0).all()
    assert main([*args, "--output", str(tmp_path / "d"), "--eos-token", "</s>"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--eos-token='</s>' is not a token of" in err and "<|doc_end|>" in err
    # A model folder whose tokenizer_config.json names the tokens but not add_bos_token: the
    # post-processor adds the BOS (Llama 3's <|begin_of_text|>), so documents start with it.
    (plain / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|doc_end|>", "bos_token": "<|doc_start|>"}))
    assert main([*args[:4], str(plain), *args[5:], "--output", str(tmp_path / "e")]) == 0
    tokens, starts = split_tokens(tmp_path / "e", "train")
    assert (tokens[starts] == 1).all()
    assert not list(tmp_path.glob(".*.partial"))


def test_workers_and_a_resumed_prepare_write_the_same_bytes(tokenizer_dir, tmp_path, monkeypatch):
    """Shards come from the input alone: 1 and 2 workers write byte-identical datasets. A prepare
    stopped after some shards (and one shard half-written) and run again keeps the finished ones
    and writes the bytes of an uninterrupted run."""
    from loom.data import prepare as prepare_module

    monkeypatch.setattr(inputs, "SHARD_BYTES", 2000)  # several shards of the small input
    root = tmp_path / "in"
    write_formats(root)
    (root / "big").mkdir()
    (root / "big" / "all.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS * 3))
    common = dict(val_fraction=0.2, progress=False, text_key="content")
    one = prepare(root, tokenizer_dir, tmp_path / "one", workers=1, **common)
    assert one["shards"] >= 8
    prepare(root, tokenizer_dir, tmp_path / "two", workers=2, **common)
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")

    real, calls = prepare_module.write_shard, []

    def stopped_at_five(shard, number, *args):
        calls.append(number)
        if number == 5:
            raise KeyboardInterrupt
        return real(shard, number, *args)

    monkeypatch.setattr(prepare_module, "write_shard", stopped_at_five)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, tokenizer_dir, tmp_path / "three", **common)
    partial = tmp_path / ".three.partial"
    assert sorted(p.name for p in (partial / "shards").iterdir()) == [f"{i:05d}" for i in range(5)]
    (partial / "shards" / ".00005.tmp").mkdir()  # what a SIGKILL in the middle of shard 5 leaves
    assert not (tmp_path / "three").exists()
    monkeypatch.setattr(prepare_module, "write_shard", lambda shard, number, *args: calls.append(number) or
                        real(shard, number, *args))
    calls.clear()
    prepare(root, tokenizer_dir, tmp_path / "three", **common)
    assert calls == list(range(5, one["shards"]))  # the finished shards were kept
    assert tree_bytes(tmp_path / "three") == tree_bytes(tmp_path / "one") and not partial.exists()


def test_bad_input_is_one_line_naming_the_file_and_leaves_nothing(tokenizer_dir, tmp_path, capsys):
    """Each case: exit status 2, one line naming the file (and its line or row), no output and no
    partial folder left behind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = "".join(json.dumps({"text": d}) + "\n" for d in DOCS[:20]).encode()
    cases = {}

    def case(name, filename, data, expected):
        folder = tmp_path / "cases" / name
        folder.mkdir(parents=True)
        if isinstance(data, pa.Table):
            pq.write_table(data, folder / filename)
        else:
            (folder / filename).write_bytes(data)
        cases[name] = (folder, expected)

    case("parquet_without_column", "x.parquet", pa.table({"body": DOCS[:3], "id": [1, 2, 3]}),
         r"x.parquet: no column 'text' \(--text-key\); its columns: body, id")
    case("parquet_not_text", "x.parquet", pa.table({"text": [1, 2, 3]}), r"x.parquet: column 'text' holds int64, not text")
    case("jsonl_not_text", "x.jsonl", lines + b'{"text": 7}\n', r"x.jsonl:21: 'text' is int 7, not text")
    case("jsonl_missing_key", "x.jsonl", b'{"body": "a"}\n', r"x.jsonl:1 has no 'text' field \(--text-key\); its fields: body")
    case("gz_not_gzip", "x.jsonl.gz", lines, r"x.jsonl.gz: not a gz file")
    case("gz_corrupt", "x.jsonl.gz", gzip.compress(lines)[:-40] + b"\0" * 40, r"x.jsonl.gz: corrupt gz data after line")
    case("zst_not_zstd", "x.jsonl.zst", lines, r"x.jsonl.zst: not a zst file")
    import zstandard

    z = zstandard.ZstdCompressor().compress(lines)
    case("zst_corrupt", "x.jsonl.zst", z[:20] + bytes(b ^ 0x5A for b in z[20:60]) + z[60:], r"x.jsonl.zst: corrupt zst data")
    for name, (folder, expected) in cases.items():
        out = tmp_path / "out" / name
        code = main(["prepare", "--input", str(folder), "--tokenizer", str(tokenizer_dir / "tokenizer.json"),
                     "--output", str(out), "--eos-token", "<|doc_end|>", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0, (name, err)
        assert __import__("re").search(expected, err), (name, err)
        assert not out.exists() and not list(out.parent.glob(".*"))


def test_blend_settings_are_checked_in_one_line_before_a_run(tokenizer_dir, dataset, tmp_path, capsys):
    """data.blend: a weight that is not a positive number, a missing source, a source too small
    for one sequence, and sources of different tokenizers: each one line, status 2."""
    other = tmp_path / "other"
    src = write_formats(tmp_path / "in")["plain.jsonl"]
    prepare(src, tokenizer_dir, other, val_fraction=0.2, progress=False, text_key="content", eos_token="<|doc_end|>")
    tiny = tmp_path / "tiny_src"
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text("a few words only")
    (tmp_path / "t" / "b.txt").write_text("and a few more")
    prepare(tmp_path / "t", tokenizer_dir, tiny, val_fraction=0.5, progress=False, eos_token="<|doc_end|>")
    base = ["train", "--model.name=tiny", "--model.vocab_size=400", "--parallel.dp_shard=1", "--parallel.pp=1",
            "--train.seq_len=32", "--quiet"]
    cases = {
        f'[[0.5, "{dataset}"], [-1, "{other}"]]': rf"the weight of '{other}' is -1; allowed: a positive number",
        f'[[0.5, "{dataset}"], ["x", "{other}"]]': r"is 'x'; allowed: a positive number",
        f'[[0.5, "{dataset}"], [0.5, "{tmp_path}/nowhere"]]': r"nowhere' is not a dataset",
        f'[[0.5, "{other}"], [0.5, "{tiny}"]]': rf"train.seq_len=32 is longer than the train split of data.blend "
                                                rf"source '{tiny}'",
        f'[[0.5, "{dataset}"], [0.5, "{other}"]]': r"data.blend mixes tokenizers",
        '[0.5, 0.5]': r"each entry must be \[weight, path\]",
    }
    for blend, expected in cases.items():
        assert main([*base, f"--data.blend={blend}"]) == 2, blend
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and __import__("re").search(expected, err), (blend, err)
    assert main([*base, f"--data.path={dataset}", f'--data.blend=[[1, "{dataset}"]]']) == 2
    assert "data.path" in capsys.readouterr().err


def test_sample_order_is_a_keyed_permutation_never_materialized():
    """Each epoch is a bijection of [0, n) chosen by (seed, epoch); any index of a 1.8-billion
    sequence epoch is computed alone (nothing of size n is allocated)."""
    import tracemalloc

    from loom.data.dataset import EpochOrder
    from loom.data.permutation import KeyedPermutation

    for n in (1, 2, 3, 7, 64, 1000, 4097):
        values = KeyedPermutation(n, (5, 0))(np.arange(n))
        assert sorted(values.tolist()) == list(range(n))
    a, b = KeyedPermutation(1000, (5, 0))(np.arange(1000)), KeyedPermutation(1000, (5, 1))(np.arange(1000))
    assert not np.array_equal(a, b) and np.array_equal(a, KeyedPermutation(1000, (5, 0))(np.arange(1000)))
    order = EpochOrder(1000, seed=3)
    assert sorted(order(np.arange(1000, 2000)).tolist()) == list(range(1000))  # epoch 1 is whole too
    tracemalloc.start()
    big = EpochOrder(1_800_000_000, seed=0)(np.arange(10**9, 10**9 + 64))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(set(big.tolist())) == 64 and (big < 1_800_000_000).all() and peak < 1 << 20


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_an_interrupted_prepare_is_one_line_and_keeps_its_finished_shards(tokenizer_dir, tmp_path, monkeypatch,
                                                                          capsys, signum):
    """SIGINT (Ctrl-C) or SIGTERM after 3 shards: one line saying what was kept, exit status 130 or
    143, no half-written shard; the same command then finishes from there."""
    import os
    import signal

    from loom.data import prepare as prepare_module

    monkeypatch.setattr(inputs, "SHARD_BYTES", 2000)
    root = tmp_path / "in"
    write_formats(root)
    real = prepare_module.write_shard

    def interrupted(shard, number, *args):
        if number == 3:
            (args[1] / ".00003.tmp").mkdir()  # a shard being written when the signal came
            os.kill(os.getpid(), getattr(signal, signum))
        return real(shard, number, *args)

    monkeypatch.setattr(prepare_module, "write_shard", interrupted)
    args = ["prepare", "--input", str(root), "--tokenizer", str(tokenizer_dir), "--text-key", "content",
            "--eos-token", "<|doc_end|>", "--output", str(tmp_path / "out"), "--quiet"]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 128 + getattr(signal, signum) and err.count("\n") == 0, err
    partial = tmp_path / ".out.partial"
    assert err.startswith(f"loom prepare: stopped by {signum}; kept 3 finished shard(s) in {partial}"), err
    assert sorted(p.name for p in (partial / "shards").iterdir()) == ["00000", "00001", "00002"]
    monkeypatch.setattr(prepare_module, "write_shard", real)
    assert main(args) == 0 and not partial.exists() and (tmp_path / "out" / "meta.json").is_file()
