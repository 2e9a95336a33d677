"""What every subsystem's config checks share: one error type and two helpers. Each subsystem
(models, parallel, train, data, checkpoint) owns its allowed values and its checks and raises
`SettingError`; loom.config composes them (and re-exports the error as ConfigError)."""
from __future__ import annotations

import difflib

import torch

# train.dtype: the compute dtype of a run (fp32 master weights either way); every layer reads it here.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SettingError(ValueError):
    """A bad setting. The message is one line: key, value, what is allowed."""


def did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def need(ok: bool, message: str) -> None:
    if not ok:
        raise SettingError(message)


def one_of(key: str, value, allowed) -> None:
    need(value in allowed,
         f"{key}={value!r} is not allowed{did_you_mean(value, allowed)}; allowed: {', '.join(map(str, allowed))}")
