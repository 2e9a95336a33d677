"""Fine-tuning examples -> a prepared SFT dataset: each example's tokens and its loss mask.

Input: JSONL, one example per line, in either form users have:
    {"input": "...", "output": "..."}            NeMo's form: the prompt template below
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   chat form

Templates (text before tokenization; the answer is what carries loss):
    input/output   prompt  = PROMPT_TEMPLATE.format(input=...)   answer = output, then EOS
    messages       each message as CHAT_TEMPLATE.format(role=..., content=...); the assistant
                   messages' text (after its role header) and their end marker are the
                   answer, everything else (system, user, the headers) the prompt; EOS ends
                   the example (and carries loss where the last message is the assistant's).
Where a tokenizer_config.json beside the tokenizer has a `chat_template`, messages are formatted
with it instead (loom.data.chat_template), its assistant contents and end-of-turn markers the
answer; the plain template applies to every other tokenizer.

A prepared SFT dataset is a folder:
    meta.json           {"format": "sft", "vocab_size", "dtype", "eos_id", "seq_len",
                         "train_on_all", "splits": {split: {"examples", "tokens",
                         "answer_tokens", "max_example", "max_token"}}, "files"}
    {split}.bin         token ids, examples back to back, each ended by eos_id
    {split}.mask.bin    uint8 per token: 1 where the token is a target (predicting it carries
                        loss), so the label at position p counts when mask[p + 1] is 1
    {split}.docs.npy    int64 start offset of every example
    tokenizer.json
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from loom.data.chat_template import find_chat_template
from loom.data.prepare import PrepareError, atomic_folder, find_eos, is_validation, open_inputs, token_dtype
from loom.files import file_record

PROMPT_TEMPLATE = "{input}\n"
CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
CHAT_ROLES = ("system", "user", "assistant")
ON_LONG = ("refuse", "truncate")


def example_segments(record, where: str, chat=None) -> list[tuple[str, bool]]:
    """(text, carries loss) pieces of one JSONL record, in order; `where` names it (file:line)
    in the one-line error a malformed record gets. chat: the tokenizer's own chat template
    (loom.data.chat_template), which formats messages in place of CHAT_TEMPLATE."""
    if isinstance(record, dict) and "input" in record and "output" in record:
        if not isinstance(record["input"], str) or not isinstance(record["output"], str):
            raise PrepareError(f"{where}: 'input' and 'output' must be strings")
        return [(PROMPT_TEMPLATE.format(input=record["input"]), False), (record["output"], True)]
    if isinstance(record, dict) and isinstance(record.get("messages"), list) and record["messages"]:
        for i, m in enumerate(record["messages"]):
            if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(m.get("content"), str):
                raise PrepareError(f"{where}: messages[{i}] must be {{'role': one of {', '.join(CHAT_ROLES)}, "
                                   f"'content': a string}}")
        if not any(m["role"] == "assistant" for m in record["messages"]):
            raise PrepareError(f"{where}: no assistant message, so nothing to learn from")
        if chat is not None:
            return chat.segments([{"role": m["role"], "content": m["content"]} for m in record["messages"]], where)
        pieces = []
        for m in record["messages"]:
            header, body = CHAT_TEMPLATE.format(role=m["role"], content="\0").split("\0")
            pieces += [(header, False), (m["content"] + body, m["role"] == "assistant")]
        return pieces
    raise PrepareError(f"{where} is neither {{'input', 'output'}} nor {{'messages': [...]}}")


@dataclass
class SplitWriter:
    """One split's files while they are written: tokens, mask, example starts, counts."""

    folder: Path
    name: str
    dtype: type
    starts: list[int] = field(default_factory=list)
    tokens: int = 0
    answer_tokens: int = 0
    max_example: int = 0
    max_token: int = -1

    def __post_init__(self):
        self.ids_file = open(self.folder / f"{self.name}.bin", "wb")
        self.mask_file = open(self.folder / f"{self.name}.mask.bin", "wb")

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.starts.append(self.tokens)
        self.tokens += len(ids)
        self.answer_tokens += int(mask.sum())
        self.max_example = max(self.max_example, len(ids))
        self.max_token = max(self.max_token, int(ids.max()))
        self.ids_file.write(ids.astype(self.dtype).tobytes())
        self.mask_file.write(mask.astype(np.uint8).tobytes())

    def close(self) -> dict:
        self.ids_file.close()
        self.mask_file.close()
        np.save(self.folder / f"{self.name}.docs.npy", np.asarray(self.starts, dtype=np.int64))
        return {"examples": len(self.starts), "tokens": self.tokens, "answer_tokens": self.answer_tokens,
                "max_example": self.max_example, "max_token": self.max_token}


SFT_FILES = ("{}.bin", "{}.mask.bin", "{}.docs.npy")


def encode_example(tokenizer, pieces: list[tuple[str, bool]], eos: int, train_on_all: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of one example: its pieces tokenized one by one (so that the mask follows
    them exactly), then EOS, which carries loss where the last piece does."""
    ids, mask = [], []
    for text, loss in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False).ids
        ids += piece
        mask += [loss or train_on_all] * len(piece)
    ids.append(eos)
    mask.append(pieces[-1][1] or train_on_all)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)


def prepare_sft(input_path: str | Path, tokenizer_path: str | Path, output: str | Path, seq_len: int,
                val_fraction: float = 0.01, on_long: str = "refuse", train_on_all: bool = False) -> dict:
    """`loom prepare --format sft`: the examples of the JSONL file(s) at input_path -> an SFT
    dataset at output, written atomically (a temporary sibling renamed once complete).

    seq_len: the training sequence an example must fit (its tokens, EOS included, at most
    seq_len + 1: inputs and labels are shifted by one); longer ones are refused (one line
    naming file:line) or, with on_long="truncate", cut to fit."""
    input_path, output = Path(input_path), Path(output)
    tokenizer = open_inputs(input_path, tokenizer_path, output, val_fraction)
    files = sorted(input_path.rglob("*.jsonl")) if input_path.is_dir() else [input_path]
    _check_sft_options(input_path, files, seq_len, on_long)
    chat = find_chat_template(tokenizer_path)
    eos = find_eos(tokenizer)
    vocab = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab)
    with atomic_folder(output) as tmp:
        writers = {s: SplitWriter(tmp, s, dtype) for s in ("train", "val")}
        truncated, dropped = _write_examples(files, input_path, tokenizer, eos, seq_len, val_fraction, on_long,
                                             train_on_all, writers, chat)
        splits = {s: w.close() for s, w in writers.items()}
        tokenizer.save(str(tmp / "tokenizer.json"))
        meta = {"format": "sft", "vocab_size": vocab, "dtype": np.dtype(dtype).name, "eos_id": eos,
                "seq_len": seq_len, "train_on_all": train_on_all, "val_fraction": val_fraction,
                "chat_template": chat.where if chat is not None else "plain",
                "source": str(input_path), "truncated": truncated, "dropped": dropped, "splits": splits,
                "files": {f.format(s): file_record(tmp / f.format(s)) for s in ("train", "val") for f in SFT_FILES}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _check_sft_options(input_path: Path, files: list[Path], seq_len: int, on_long: str) -> None:
    if not files:
        raise PrepareError(f"--input={str(input_path)!r} holds no .jsonl files")
    if seq_len < 2:
        raise PrepareError(f"--seq-len={seq_len} must be at least 2 (the training sequence examples must fit)")
    if on_long not in ON_LONG:
        raise PrepareError(f"--on-long={on_long!r} is not allowed; allowed: {', '.join(ON_LONG)}")


def _write_examples(files: list[Path], root: Path, tokenizer, eos: int, seq_len: int, val_fraction: float,
                    on_long: str, train_on_all: bool, writers: dict, chat=None) -> tuple[int, int]:
    """Every example of `files` into its split's writer; returns how many were truncated and how
    many dropped (truncation left no answer token to learn from)."""
    truncated = dropped = 0
    for path in files:
        rel = path.relative_to(root).as_posix() if root.is_dir() else path.name
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{where} is not JSON ({e.msg})") from None
                ids, mask = encode_example(tokenizer, example_segments(record, where, chat), eos, train_on_all)
                if len(ids) > seq_len + 1:
                    if on_long == "refuse":
                        raise PrepareError(f"{where}: the example is {len(ids)} tokens, longer than --seq-len={seq_len} "
                                           f"+ 1; allowed: --on-long=truncate, or a longer --seq-len")
                    ids, mask, truncated = ids[: seq_len + 1], mask[: seq_len + 1], truncated + 1
                if not mask[1:].any():  # an answer truncated away: nothing left to learn from
                    dropped += 1
                    continue
                writers["val" if is_validation(f"{rel}:{n}", val_fraction) else "train"].add(ids, mask)
    return truncated, dropped
