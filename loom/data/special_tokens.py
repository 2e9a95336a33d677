"""The tokenizer `loom prepare` uses and the tokens it puts around every document.

--tokenizer names a tokenizer.json, or a Hugging Face model folder holding one. Its
tokenizer_config.json (beside the file, or in the folder) gives `eos_token`, `bos_token` and
`add_bos_token`, as transformers reads them; --eos-token and --bos-token override them. Without
`add_bos_token`, a document starts with the BOS token when the tokenizer's own post-processor
adds it (Llama 3: `<|begin_of_text|>`). Without any of these, the end-of-document token is the
first of EOS_CANDIDATES the vocabulary has.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loom.data.inputs import PrepareError

EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")


@dataclass(frozen=True)
class DocumentTokens:
    """Ids around every document: [bos] + text + [eos] (bos None: no BOS)."""

    eos: int
    bos: int | None = None


def tokenizer_json(path: str | Path) -> Path:
    """The tokenizer.json --tokenizer names (a file, or a model folder holding one)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise PrepareError(f"--tokenizer={str(path)!r} is a folder without tokenizer.json; allowed: a "
                               f"tokenizer.json, or a Hugging Face model folder holding one")
        return path / "tokenizer.json"
    if not path.is_file():
        raise PrepareError(f"--tokenizer={str(path)!r}: no such file")
    return path


def tokenizer_config(file: Path) -> dict:
    """tokenizer_config.json beside the tokenizer.json, or {}."""
    config = file.parent / "tokenizer_config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise PrepareError(f"{config}: not JSON ({e})") from None


def _token_name(value) -> str | None:
    """A config's token entry: a string, or {"content": ...} (AddedToken's form)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _token_id(tokenizer, name: str, setting: str, file: Path) -> int:
    i = tokenizer.token_to_id(name)
    if i is None:
        special = sorted(t.content for t in tokenizer.get_added_tokens_decoder().values())[:8]
        raise PrepareError(f"{setting}={name!r} is not a token of {file}; its special tokens: "
                           f"{', '.join(special) or 'none'}")
    return i


def _adds_bos(tokenizer, bos: int) -> bool:
    """The tokenizer's post-processor starts an encoding with `bos` (as Llama 3's does)."""
    ids = tokenizer.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos


def guessed_eos(tokenizer) -> int | None:
    """The id of the first of EOS_CANDIDATES the tokenizer has, or None."""
    return next((i for i in (tokenizer.token_to_id(n) for n in EOS_CANDIDATES) if i is not None), None)


def document_tokens(tokenizer, file: Path, eos_token: str | None, bos_token: str | None) -> DocumentTokens:
    """The EOS and BOS ids of documents (see the module's docstring)."""
    config = tokenizer_config(file)
    eos_name = eos_token or _token_name(config.get("eos_token"))
    if eos_name:
        eos = _token_id(tokenizer, eos_name, "--eos-token" if eos_token else f"eos_token of {file.parent}", file)
    else:
        eos = guessed_eos(tokenizer)
        if eos is None:
            raise PrepareError(f"the tokenizer {file} has none of the end-of-document tokens "
                               f"{', '.join(EOS_CANDIDATES)}; name its own with --eos-token")
    if bos_token:
        return DocumentTokens(eos, _token_id(tokenizer, bos_token, "--bos-token", file))
    bos_name = _token_name(config.get("bos_token"))
    if not bos_name:
        return DocumentTokens(eos)
    bos = _token_id(tokenizer, bos_name, f"bos_token of {file.parent}", file)
    add = config.get("add_bos_token")
    return DocumentTokens(eos, bos if (add if add is not None else _adds_bos(tokenizer, bos)) else None)


def load_tokenizer(path: str | Path):
    """(Tokenizer, its tokenizer.json path) of --tokenizer."""
    from tokenizers import Tokenizer

    file = tokenizer_json(path)
    try:
        return Tokenizer.from_file(str(file)), file
    except Exception as e:  # tokenizers raises a bare Exception on a bad file
        raise PrepareError(f"--tokenizer={str(path)!r} is not a tokenizer.json: {e}") from None
