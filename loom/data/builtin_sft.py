"""The embedded fine-tuning set `builtin:python-stdlib-sft`: questions about the running Python's
standard library answered by the first lines of their docstrings, in the input/output form, e.g.

    {"input": "What does json.dumps(obj, *, skipkeys, ...) do?", "output": "Serialize ``obj`` to a JSON formatted ``str``."}

Read from the library's sources with `ast` (nothing is imported or run), tokenized with the
builtin corpus's tokenizer (loom.data.stdlib), prepared by loom.data.sft, and cached beside that
corpus; nothing is fetched from the network.
"""
from __future__ import annotations

import ast
import json
import sys
import tempfile
from pathlib import Path

from loom.data.stdlib import builtin_dataset, stdlib_files
from loom.locks import exclusive_lock

BUILTIN_SFT = "builtin:python-stdlib-sft"
MAX_EXAMPLE_TOKENS = 128  # so the set serves any train.seq_len from 127 up
MAX_ARGS_SHOWN = 3


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    names = [a.arg for a in (*node.args.posonlyargs, *node.args.args) if a.arg not in ("self", "cls")]
    names += [f"*{node.args.vararg.arg}"] if node.args.vararg else []
    names += [a.arg for a in node.args.kwonlyargs]
    shown = ", ".join(names[:MAX_ARGS_SHOWN]) + (", ..." if len(names) > MAX_ARGS_SHOWN else "")
    return f"({shown})"


def _answer(node) -> str | None:
    """The docstring's first line, where it is a sentence worth learning."""
    doc = ast.get_docstring(node)
    first = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
    return first if 8 <= len(first) <= 200 else None


def module_examples(module: str, source: str) -> list[dict]:
    """{"input", "output"} of every public function, class and method of one module's source."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []

    def visit(body, prefix: str) -> None:
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            answer = _answer(node)
            name = f"{prefix}{node.name}"
            if answer:
                what = name if isinstance(node, ast.ClassDef) else f"{name}{_signature(node)}"
                kind = "the class" if isinstance(node, ast.ClassDef) else ""
                out.append({"input": f"What does {kind + ' ' if kind else ''}{what} do?", "output": answer})
            if isinstance(node, ast.ClassDef):
                visit(node.body, f"{name}.")

    visit(tree.body, f"{module}.")
    return out


def stdlib_examples() -> list[dict]:
    root, files = stdlib_files()
    examples = []
    for path in files:
        parts = path.relative_to(root).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        if any(part.startswith("_") for part in parts):  # private modules: not what users call
            continue
        module = ".".join(parts)
        examples += module_examples(module, path.read_text(encoding="utf-8", errors="replace"))
    return examples


def builtin_sft_dataset(progress: bool = True) -> Path:
    """Path of the prepared builtin fine-tuning set, building it (seconds) if not cached."""
    from loom.data.sft import prepare_sft

    corpus = builtin_dataset(progress=progress)
    path = corpus.with_name(f"{corpus.name}-sft")
    if (path / "meta.json").is_file():
        return path
    with exclusive_lock(path.parent / f"{path.name}.lock"):
        if (path / "meta.json").is_file():
            return path
        examples = stdlib_examples()
        if progress:
            print(f"loom: building the builtin fine-tuning set ({len(examples):,} questions about the standard "
                  f"library; once; cached in {path})", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            jsonl = Path(tmp) / "stdlib_docstrings.jsonl"
            jsonl.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
            prepare_sft(jsonl, corpus / "tokenizer.json", path, MAX_EXAMPLE_TOKENS - 1, val_fraction=0.02,
                        on_long="truncate")
    return path
