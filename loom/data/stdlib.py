"""The embedded default corpus `builtin:python-stdlib`: the running Python's own standard
library sources, tokenized by a byte-level BPE trained on them on first use; and
`builtin:python-stdlib-docs`, the prose of the same modules (their docstrings) in the same
tokenizer, a second source for blends. Cached under the user's cache folder; nothing is
fetched from the network.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

from loom.data.mlm import MASK_TOKEN
from loom.data.prepare import write_dataset
from loom.locks import exclusive_lock
from loom.files import cache_dir

BUILTIN_VOCAB_SIZE = 8192
BUILTIN_DOCS = "builtin:python-stdlib-docs"  # the same modules' docstrings, in the same tokenizer
VAL_FRACTION = 0.02
EOS = "<|endoftext|>"
# Test suites and bundled tools are skipped: they are large, repetitive and full of odd strings.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def stdlib_files() -> tuple[Path, list[Path]]:
    """(the standard library's folder, its .py files outside SKIP_DIRS, sorted). The skipped
    folders are not entered (the interpreter's site-packages can hold far more than the
    library: a listing of everything took 0.5-0.8 s, at every start of the embedded default)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        files += [Path(folder, name) for name in names if name.endswith(".py")]
    return root, sorted(files)


def _corpus_key(root: Path, files: list[Path]) -> str:
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(root)}:{p.stat().st_size}\n".encode())
    v = sys.version_info
    return f"python{v.major}.{v.minor}.{v.micro}-{h.hexdigest()[:12]}-v{BUILTIN_VOCAB_SIZE}-mask"


def train_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, MASK_TOKEN],  # [MASK]: masked-LM pretraining (BERT)
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def builtin_dataset(progress: bool = True) -> Path:
    """Path of the prepared stdlib dataset, building it (about half a minute) if not cached."""
    root, files = stdlib_files()
    path = cache_dir() / "data" / _corpus_key(root, files)
    if (path / "meta.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may start at once: one builds, the others wait for it.
    with exclusive_lock(path.parent / f"{path.name}.lock"):
        if (path / "meta.json").is_file():
            return path
        if progress:
            print(f"loom: building the builtin corpus from {len(files)} files under {root} "
                  f"(once; cached in {path})", file=sys.stderr)
        docs = [(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
                for p in files]
        tokenizer = train_bpe([text for _, text in docs], BUILTIN_VOCAB_SIZE)
        write_dataset(docs, tokenizer, path, VAL_FRACTION, source=f"builtin:python-stdlib ({root})",
                      progress=progress)
    return path


def docstrings(source: str) -> str:
    """The docstrings of a module, its classes and functions, in source order ("" if none or if
    the file does not parse)."""
    import ast
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
    return "\n\n".join(d for d in found if d)


def builtin_docs_dataset(progress: bool = True) -> Path:
    """Path of the stdlib's docstrings as a dataset in the builtin tokenizer, built if not cached."""
    from tokenizers import Tokenizer

    base = builtin_dataset(progress)
    root, files = stdlib_files()
    path = base.parent / f"{base.name}-docs"
    if (path / "meta.json").is_file():
        return path
    with exclusive_lock(path.parent / f"{path.name}.lock"):
        if (path / "meta.json").is_file():
            return path
        if progress:
            print(f"loom: building the builtin docstring corpus (once; cached in {path})", file=sys.stderr)
        docs = [(p.relative_to(root).as_posix(), docstrings(p.read_text(encoding="utf-8", errors="replace")))
                for p in files]
        write_dataset([d for d in docs if d[1]], Tokenizer.from_file(str(base / "tokenizer.json")), path,
                      VAL_FRACTION, source=f"{BUILTIN_DOCS} ({root})", progress=progress)
    return path
