"""Fine-tuning data (`loom prepare --format sft`): both JSONL forms, loss masks that cover the
answers only (or everything), long examples refused or truncated, malformed lines named."""
import json
import math

import numpy as np
import pytest
from tokenizers import Tokenizer

from loom.cli import main

EXAMPLES = [
    {"input": "What does len do?", "output": "Return the number of items."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is abs?"},
                  {"role": "assistant", "content": "Absolute value."}]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_split(folder, split="train"):
    meta = json.loads((folder / "meta.json").read_text())
    ids = np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"])
    mask = np.fromfile(folder / f"{split}.mask.bin", dtype=np.uint8).astype(bool)
    starts = list(np.load(folder / f"{split}.docs.npy")) + [len(ids)]
    return meta, [(ids[a:b], mask[a:b]) for a, b in zip(starts, starts[1:])]


def prepare(tmp_path, text_corpus, records, *extra, name="sft"):
    _, tok, _ = text_corpus
    src = write_jsonl(tmp_path / f"{name}.jsonl", records)
    return main(["prepare", "--format", "sft", "--input", str(src), "--tokenizer", str(tok),
                 "--output", str(tmp_path / name), "--val-fraction", "0", *extra])


def test_answers_carry_the_loss_in_both_forms(tmp_path, text_corpus, capsys):
    assert prepare(tmp_path, text_corpus, EXAMPLES, "--seq-len", "256") == 0
    assert "train 2 examples" in capsys.readouterr().out
    meta, examples = read_split(tmp_path / "sft")
    tok = Tokenizer.from_file(str(tmp_path / "sft" / "tokenizer.json"))
    decoded = [(tok.decode(ids[~m].tolist()), tok.decode(ids[m].tolist())) for ids, m in examples]
    assert decoded[0] == ("What does len do?\n", "Return the number of items.")
    assert decoded[1] == ("<|system|>\nBe brief.\n<|user|>\nWhat is abs?\n<|assistant|>\n", "Absolute value.\n")
    for ids, m in examples:  # each ends with EOS, a target after an answer
        assert ids[-1] == meta["eos_id"] and m[-1]
    assert meta["splits"]["train"]["answer_tokens"] == sum(int(m.sum()) for _, m in examples)


def test_train_on_all_makes_every_token_a_target(tmp_path, text_corpus):
    assert prepare(tmp_path, text_corpus, EXAMPLES, "--seq-len", "256", "--train-on-all") == 0
    _, examples = read_split(tmp_path / "sft")
    assert all(m.all() for _, m in examples)


def test_long_examples_are_refused_or_truncated(tmp_path, text_corpus, capsys):
    long = {"input": "q", "output": "an answer " * 40}
    assert prepare(tmp_path, text_corpus, [EXAMPLES[0], long], "--seq-len", "64") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sft.jsonl:2" in err and "--seq-len=64" in err and "truncate" in err
    assert not (tmp_path / "sft").exists() and not list(tmp_path.glob(".sft.*"))  # nothing half-written
    assert prepare(tmp_path, text_corpus, [EXAMPLES[0], long], "--seq-len", "64", "--on-long", "truncate") == 0
    meta, examples = read_split(tmp_path / "sft")
    assert meta["truncated"] == 1 and max(len(ids) for ids, _ in examples) == 65


@pytest.mark.parametrize("line,words", [
    ("{not json", ["bad.jsonl:2 is not JSON"]),
    ('{"input": "a"}', ["bad.jsonl:2 is neither", "'messages'"]),
    ('{"messages": [{"role": "user", "content": "hi"}]}', ["bad.jsonl:2", "no assistant message"]),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', ["bad.jsonl:2", "messages[0]", "system, user, assistant"]),
])
def test_malformed_lines_are_named(tmp_path, text_corpus, capsys, line, words):
    _, tok, _ = text_corpus
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(EXAMPLES[0]) + "\n" + line + "\n")
    code = main(["prepare", "--format", "sft", "--input", str(src), "--tokenizer", str(tok),
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_data_format_must_match_the_folder_and_fit_the_sequence(tmp_path, text_corpus, dataset, capsys):
    assert prepare(tmp_path, text_corpus, EXAMPLES, "--seq-len", "256") == 0
    capsys.readouterr()
    base = ["train", "--parallel.dp_shard=1", "--parallel.pp=1", "--model.vocab_size=300"]
    cases = [
        ([f"--data.path={tmp_path / 'sft'}"], ["fine-tuning examples", "data.format='sft'"]),
        ([f"--data.path={dataset}", "--data.format=sft"], ["holds documents", "data.format='tokens'"]),
        (["--data.format=sft"], ["builtin:python-stdlib-sft"]),
        ([f"--data.path={tmp_path / 'sft'}", "--data.format=sft", "--train.seq_len=8"],
         ["train.seq_len=8", "longest train example"]),
        ([f"--data.path={tmp_path / 'sft'}", "--data.format=sft", "--model.name=tiny-bert"], ["bidirectional"]),
        ([f"--data.path={tmp_path / 'sft'}", "--data.format=chat"], ["data.format='chat'", "tokens, sft"]),
    ]
    for extra, words in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err


def test_fine_tuning_run_learns_the_answers(sft_dataset, tmp_path):
    """A packed SFT run in one process: the answer-only validation loss falls, and the metrics
    count attention per example (the packed sequences' sum of squared example lengths)."""
    import json

    from loom.data.packing import PackedExamples
    from loom.metrics.flops import flops_per_token
    from loom.models.registry import get_model_config
    import dataclasses

    jsonl = tmp_path / "m.jsonl"
    args = ["train", "--quiet", "--parallel.dp_shard=1", "--parallel.pp=1", "--model.vocab_size=300",
            "--model.n_layers=2", "--data.format=sft", f"--data.path={sft_dataset}", "--train.seq_len=32",
            "--train.steps=30", "--train.warmup_steps=2", "--train.eval_every=0", f"--metrics.jsonl={jsonl}",
            "--metrics.plot=", "--metrics.log_every=1"]
    assert main(args) == 0
    rows = [json.loads(line) for line in open(jsonl)]
    assert rows[-1]["val_loss"] < 0.6 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["val_loss"])
    packed = PackedExamples(sft_dataset, "train", 32, seed=0)
    assert packed.attention_len < 32  # examples shorter than the sequence attend less
    model = dataclasses.replace(get_model_config("tiny"), vocab_size=300, n_layers=2)
    fpt = flops_per_token(model, packed.attention_len)
    assert rows[-1]["tflops_per_device"] == pytest.approx(rows[-1]["tokens_per_s_per_device"] * fpt / 1e12, rel=1e-6)


def test_first_fit_decreasing_packs_every_example_once_within_capacity():
    from loom.data.packing import first_fit_decreasing

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=200).tolist()
    bins = first_fit_decreasing(lengths, 64, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert bins == first_fit_decreasing(lengths, 64, seed=3)  # deterministic for a seed
    # Near the fewest bins possible (FFD's guarantee is 11/9 of the optimum + 6/9; measured here
    # against the volume bound, which the optimum is at least).
    assert len(bins) <= 11 / 9 * math.ceil(sum(lengths) / 64) + 1
    with pytest.raises(ValueError):
        first_fit_decreasing([65], 64, seed=0)


def test_packed_sequences_keep_examples_apart(tmp_path, text_corpus):
    from loom.data.mlm import IGNORE_INDEX
    from loom.data.packing import PackedExamples

    records = [EXAMPLES[i % 2] for i in range(9)] + [{"input": "q" * (i + 1), "output": "a"} for i in range(9)]
    assert prepare(tmp_path, text_corpus, records, "--seq-len", "128") == 0
    meta, examples = read_split(tmp_path / "sft")
    packed = PackedExamples(tmp_path / "sft", "train", 128, seed=0)
    assert packed.pairs == sum(len(ids) - 1 for ids, _ in examples) and 0.5 < packed.efficiency <= 1
    seen = []
    for i in range(packed.n_sequences):
        inputs, labels, documents = packed.sequence(i)
        for doc in np.unique(documents):
            at = np.flatnonzero(documents == doc)
            assert (np.diff(at) == 1).all()  # a document is one contiguous span
            if doc == len(packed.sequences[i]):  # padding: no loss
                assert (labels[at] == IGNORE_INDEX).all() and at[-1] == 127
                continue
            ids, mask = examples[packed.sequences[i][doc]]
            ids = ids.astype(np.int64)
            assert (inputs[at] == ids[:-1]).all()  # its own tokens; labels from inside it only
            assert (labels[at] == np.where(mask[1:], ids[1:], IGNORE_INDEX)).all()
            seen.append(packed.sequences[i][doc])
    assert sorted(seen) == list(range(len(examples)))
    batch = packed.batch(np.arange(packed.n_sequences))
    assert batch.inputs.shape == batch.labels.shape == batch.documents.shape == (packed.n_sequences, 128)


def test_builtin_fine_tuning_set_asks_about_the_stdlib(tmp_path, monkeypatch):
    """builtin:python-stdlib-sft: a question per documented public function, class or method,
    answered by its docstring's first line, read with ast (nothing imported), cached."""
    from loom.data import builtin_sft, stdlib
    from loom.data.builtin_sft import builtin_sft_dataset, module_examples

    source = '''
def shown(a, b, *rest, key=None):
    """Return the thing.

    More text that is not the answer."""

def _private():
    """Never asked about."""

class Box:
    """A box of things."""
    def open(self, how):
        """Open the box."""
'''
    assert module_examples("pkg.mod", source) == [
        {"input": "What does pkg.mod.shown(a, b, *rest, ...) do?", "output": "Return the thing."},
        {"input": "What does the class pkg.mod.Box do?", "output": "A box of things."},
        {"input": "What does pkg.mod.Box.open(how) do?", "output": "Open the box."},
    ]
    files = stdlib.stdlib_files()[1]
    few = (files[0].parent, [p for p in files if p.name in ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py",
                                                            "bisect.py", "heapq.py", "colorsys.py")])
    monkeypatch.setattr(stdlib, "stdlib_files", lambda: few)
    monkeypatch.setattr(builtin_sft, "stdlib_files", lambda: few)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = builtin_sft_dataset(progress=False)
    meta, examples = read_split(path)
    assert meta["format"] == "sft" and len(examples) > 20
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    prompts = [tok.decode(ids[~m].tolist()) for ids, m in examples]
    assert all(p.startswith("What does ") and p.endswith(" do?\n") for p in prompts)
    assert any("textwrap.dedent(text) do?" in p for p in prompts)
    assert builtin_sft_dataset(progress=False) == path  # cached


LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}")


def test_a_tokenizers_chat_template_formats_messages(tmp_path, text_corpus, capsys):
    """tokenizer_config.json's chat_template (Jinja) formats the messages; its assistant contents
    and end-of-turn markers carry the loss, everything else (BOS, headers, user turns) does not."""
    import shutil

    _, tok, _ = text_corpus
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(tok, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_TEMPLATE, "bos_token": "<s>"}))
    src = write_jsonl(tmp_path / "chat.jsonl", [EXAMPLES[1]])
    assert main(["prepare", "--format", "sft", "--input", str(src), "--tokenizer", str(folder / "tokenizer.json"),
                 "--output", str(tmp_path / "sft"), "--val-fraction", "0", "--seq-len", "256"]) == 0
    assert "chat template of" in capsys.readouterr().out
    _, [(ids, mask)] = read_split(tmp_path / "sft")
    decoder = Tokenizer.from_file(str(tmp_path / "sft" / "tokenizer.json"))
    assert decoder.decode(ids[~mask].tolist()) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nWhat is abs?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert decoder.decode(ids[mask].tolist()).startswith("Absolute value.<|eot_id|>")

    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ messages[-1]['content'] }}"}))  # renders only the last message: not cuttable
    assert main(["prepare", "--format", "sft", "--input", str(src), "--tokenizer", str(folder / "tokenizer.json"),
                 "--output", str(tmp_path / "sft2"), "--val-fraction", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chat.jsonl:1" in err and "rewrites the text before it" in err
    assert not (tmp_path / "sft2").exists()
