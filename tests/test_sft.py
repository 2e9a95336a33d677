"""Fine-tuning data (`loom prepare --format sft`): both JSONL forms, loss masks that cover the
answers only (or everything), long examples refused or truncated, malformed lines named."""
import json

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


def test_training_on_an_sft_folder_is_refused_until_it_is_supported(tmp_path, text_corpus, capsys):
    assert prepare(tmp_path, text_corpus, EXAMPLES, "--seq-len", "256") == 0
    capsys.readouterr()
    assert main(["train", "--parallel.dp_shard=1", "--parallel.pp=1", "--model.vocab_size=300",
                 f"--data.path={tmp_path / 'sft'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fine-tuning examples" in err
