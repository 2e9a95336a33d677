"""Megatron interchange and blending, against megatron-core itself (a test-only extra): its
IndexedDataset reads what `loom prepare --output-format megatron` writes, loom trains on what its
IndexedDatasetBuilder writes, and loom's blend follows its helpers_cpp.build_blending_indices."""
import json
import struct
import warnings

import numpy as np
import pytest
import torch

from loom.cli import main
from loom.data.blend import BlendSequence, normalized
from loom.data.dataset import TokenDataset
from loom.data.prepare import prepare

pytestmark = pytest.mark.slow  # importing megatron.core takes several seconds


@pytest.fixture(scope="module")
def megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datasets = pytest.importorskip("megatron.core.datasets")
        from megatron.core.datasets import helpers_cpp, indexed_dataset
    return datasets, helpers_cpp, indexed_dataset


def corpus(root, n=50):
    root.mkdir(parents=True, exist_ok=True)
    docs = [f"def f_{i}(x):\n    return x * {i}  # document {i}\n" * (1 + i % 4) for i in range(n)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return root


@pytest.mark.parametrize("weights", [[0.7, 0.3], [0.5, 0.3, 0.2], [1, 1, 1, 1, 1], [0.001, 0.999]])
def test_blend_sources_equal_megatron_build_blending_indices(megatron, weights):
    """Samples 0..10^6: loom's source and index within it equal helpers_cpp's, and every source's
    count stays within one sample of weight x samples at every step."""
    _, helpers_cpp, _ = megatron
    n = 10**6
    source = np.zeros(n, dtype=np.int16)
    within = np.zeros(n, dtype=np.int64)
    helpers_cpp.build_blending_indices(source, within, np.array(normalized(weights)), len(weights), n, False)
    ours, ours_within = BlendSequence(weights).draw(n)
    assert np.array_equal(ours, source) and np.array_equal(ours_within, within)
    counts = np.stack([np.cumsum(ours == i) for i in range(len(weights))], axis=1)  # [n, sources]
    expected = np.arange(1, n + 1)[:, None] * np.array(normalized(weights))[None, :]
    assert np.abs(counts - expected).max() <= 1.0


def test_megatron_core_reads_what_loom_writes(megatron, text_corpus, tmp_path):
    """`loom prepare --output-format megatron`: megatron-core's IndexedDataset reads every document
    with the tokens loom's own format holds for it, one sequence per document."""
    _, _, indexed = megatron
    root, tok, _ = text_corpus
    prefix = tmp_path / "mg" / "corpus_text_document"
    meta = prepare(root, tok, prefix, progress=False, output_format="megatron")
    ours = prepare(root, tok, tmp_path / "loom", val_fraction=0.0, progress=False)
    ds = indexed.IndexedDataset(str(prefix))
    assert len(ds) == meta["splits"]["train"]["documents"] == ours["splits"]["train"]["documents"]
    assert list(ds.document_indices) == list(range(len(ds) + 1))
    data = TokenDataset(tmp_path / "loom", "train", 8)
    starts = np.concatenate([np.asarray(s.starts) + o for s, o in zip(data.stream.spans, data.stream.offsets)])
    ends = [*starts[1:], len(data.stream)]
    for i in range(len(ds)):
        assert ds[i].dtype == np.uint16 and ds[i].tolist() == data.stream.read(starts[i], ends[i]).tolist()


def test_loom_trains_on_what_megatron_core_writes(megatron, text_corpus, tmp_path, capsys):
    """A dataset megatron-core's IndexedDatasetBuilder wrote (int32 ids, documents of several
    sequences): loom's stream is its tokens in order, its documents are Megatron's, packed
    batches keep to them, and `loom train` runs on the prefix with data.tokenizer."""
    _, _, indexed = megatron
    root, tok_path, docs = text_corpus
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    eos = tok.token_to_id("<|endoftext|>")
    prefix = str(tmp_path / "megatron_text_document")
    builder = indexed.IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    expected, doc_of = [], []
    for d, text in enumerate(docs):
        for part in text.split("\n", 1):  # two sequences per document, as sentence splitting writes
            ids = tok.encode(part).ids
            builder.add_item(torch.tensor(ids, dtype=torch.int32))
            expected += ids
            doc_of += [d] * len(ids)
        builder.end_document()
        builder.add_item(torch.tensor([eos], dtype=torch.int32))
        builder.end_document()  # an EOD document of its own, as --append-eod writes
        expected.append(eos)
        doc_of.append(-1 - d)
    builder.finalize(prefix + ".idx")
    train, val = TokenDataset(prefix, "train", 16), TokenDataset(prefix, "val", 16)
    stream = np.concatenate([train.stream.read(0, len(train.stream)), val.stream.read(0, len(val.stream))])
    assert stream.tolist() == expected
    positions = np.arange(len(train.stream))
    ours = train.stream.document_of(positions)
    theirs = np.array(doc_of[:len(train.stream)])
    changes = lambda a: np.flatnonzero(np.diff(a) != 0)  # noqa: E731 -- where a new document starts
    assert np.array_equal(changes(ours), changes(theirs))
    batch = train.batch(np.array([0, 3]), documents=True)
    for row, i in zip(batch.documents, (0, 3)):
        assert np.array_equal(changes(row.numpy()), changes(theirs[i * 16:i * 16 + 16]))
    args = ["train", "--model.name=tiny", "--model.dim=32", "--model.n_layers=1", "--model.n_heads=2",
            "--model.n_kv_heads=2", "--model.ffn_dim=64", "--model.vocab_size=300", "--parallel.dp_shard=1",
            "--parallel.pp=1", f"--data.path={prefix}", f"--data.tokenizer={tok_path}", "--data.pack_documents=true",
            "--train.seq_len=16", "--train.steps=2", "--train.micro_batch=2", "--train.global_batch=2",
            f"--metrics.jsonl={tmp_path}/m.jsonl", "--metrics.plot=", "--quiet"]
    assert main(args) == 0
    assert len(open(tmp_path / "m.jsonl").readlines()) >= 1


def write_idx(path, magic=b"MMIDIDX\x00\x00", version=1, code=8, sizes=(3, 2), bin_tokens=5):
    """A hand-made .idx/.bin pair (Megatron's layout), optionally wrong in one field."""
    sizes = np.array(sizes, dtype=np.int32)
    pointers = (np.cumsum(sizes) - sizes).astype(np.int64) * 2
    with open(f"{path}.idx", "wb") as f:
        f.write(magic + struct.pack("<Q", version) + struct.pack("<B", code))
        f.write(struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(sizes) + 1))
        f.write(sizes.tobytes() + pointers.tobytes() + np.arange(len(sizes) + 1, dtype=np.int64).tobytes())
    np.arange(bin_tokens, dtype=np.uint16).tofile(f"{path}.bin")


@pytest.mark.parametrize("name,fault,expected", [
    ("magic", {"magic": b"NOTANIDX\x00"}, r"not a Megatron index \(its first bytes are b'NOTANIDX"),
    ("version", {"version": 2}, r"index version 2; allowed: 1"),
    ("dtype", {"code": 7}, r"dtype code 7 \(float32, not token ids\); allowed: 1 \(uint8\), 4 \(int32\)"),
    ("sizes", {"bin_tokens": 4}, r"\.bin: 8 bytes, but its index .*\.idx ends its last sequence at byte 10"),
])
def test_a_damaged_megatron_index_is_one_line_before_a_run(tmp_path, capsys, name, fault, expected):
    prefix = tmp_path / f"bad_{name}"
    write_idx(prefix, **fault)
    code = main(["train", "--model.name=tiny", "--model.vocab_size=300", "--parallel.dp_shard=1", "--parallel.pp=1",
                 f"--data.path={prefix}", "--train.seq_len=2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and f"data.path='{prefix}'" in err
    assert __import__("re").search(expected, err), err
