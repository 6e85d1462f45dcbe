"""Loading checkpoints written by the authors' public code (AMIR, TAT, Restormer) into our networks.

Our networks keep the authors' top-level module names (``patch_embed``, ``encoder_level1``, ``down1_2``, ...),
but some inner blocks are MONAI blocks or carry our own names, so a few state-dict keys differ. Every network
class that can read an official checkpoint offers

* ``convert_official_state_dict(state_dict) -> state_dict`` (static): authors' key names -> ours, and
* ``to_official_state_dict() -> state_dict``: ours -> the authors' key names (the reverse mapping).

Both are built from :class:`KeyRule` tables and :func:`rename_state_dict`. Conversion is idempotent: a state
dict that already uses our names passes through unchanged, so :func:`load_official_state_dict` also accepts
checkpoints written by this package.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ..wrappers import unwrap

__all__ = [
    "CheckpointError",
    "KeyRule",
    "load_weights_file",
    "rename_state_dict",
    "unwrap_checkpoint",
    "load_official_state_dict",
    "to_official_state_dict",
    "CHECKPOINT_WRAPPER_KEYS",
]

class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded as plain weights (unsafe pickle, corrupt or not a checkpoint)."""


def load_weights_file(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")`` with one-line errors naming the file.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the pickle would run code (it references objects other than tensors and containers:
            refused, never executed), or the file is truncated, corrupt or not a PyTorch checkpoint.
    """
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: checkpoint file does not exist")
    try:
        return torch.load(source, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only load failed" in first.lower():
            raise CheckpointError(
                f"{source}: refused: not plain weights, its pickle would run code (load it with "
                f"weights_only=True only if you trust and convert it yourself)"
            ) from None
        raise CheckpointError(f"{source}: not a PyTorch checkpoint ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{source}: unreadable checkpoint, truncated or corrupt ({first})") from None


#: keys under which training scripts commonly nest the weights of a checkpoint dictionary
CHECKPOINT_WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model", "params_ema", "params", "net", "ema_model")
#: prefix added by ``DataParallel`` / ``DistributedDataParallel``
DDP_PREFIX = "module."
#: how many offending keys an error message lists before it abbreviates
_MAX_KEYS_IN_ERROR = 20

# regular expressions the placeholders of a KeyRule pattern stand for
_PLACEHOLDERS: dict[str, str] = {
    "pre": r"(?:.*\.)?",  # any module path ending in a dot, or nothing
    "i": r"\d+",  # a ModuleList / Sequential index
    "p": r"(?:weight|bias)",  # a parameter name of a conv / linear / norm layer
    "name": r"[A-Za-z0-9_]+",  # one module name
}
_PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")


def _compile(pattern: str, extra: Mapping[str, str]) -> re.Pattern[str]:
    """Turn ``"{pre}norm{i}.body.{p}"`` into an anchored regular expression with named groups."""
    table = {**_PLACEHOLDERS, **extra}
    parts, pos, seen = [], 0, set()
    for m in _PLACEHOLDER_RE.finditer(pattern):
        name = m.group(1)
        if name not in table:
            raise ValueError(f"KeyRule pattern {pattern!r}: unknown placeholder {{{name}}}.")
        parts.append(re.escape(pattern[pos : m.start()]))
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>{table[name]})")
        seen.add(name)
        pos = m.end()
    parts.append(re.escape(pattern[pos:]))
    return re.compile("^" + "".join(parts) + "$")


@dataclass(frozen=True)
class KeyRule:
    """One renaming between an official key pattern and ours, usable in both directions.

    Patterns are key names with placeholders: ``{pre}`` (module path ending in ``.`` or empty), ``{i}`` (index),
    ``{p}`` (``weight``/``bias``), ``{name}`` (one module name), plus any given in ``choices``
    (placeholder -> regular expression). ``ours=None`` means the official key is dropped (for example unused
    buffers); such a rule cannot be reversed, see :func:`rename_state_dict` ``extra``.
    """

    official: str
    ours: str | None
    choices: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        compiled = {
            "official": _compile(self.official, self.choices),
            "ours": None if self.ours is None else _compile(self.ours, self.choices),
        }
        object.__setattr__(self, "_compiled", compiled)

    def apply(self, key: str, reverse: bool = False) -> tuple[bool, str | None]:
        """Return ``(matched, new_key)``; ``new_key`` is None when the key is dropped."""
        src_name, dst = ("ours", self.official) if reverse else ("official", self.ours)
        pattern = self._compiled[src_name]  # type: ignore[attr-defined]
        if pattern is None:
            return False, key
        m = pattern.match(key)
        if m is None:
            return False, key
        if dst is None:
            return True, None
        return True, _PLACEHOLDER_RE.sub(lambda g: m.group(g.group(1)), dst)


def rename_state_dict(
    state_dict: Mapping[str, Any], rules: Sequence[KeyRule], reverse: bool = False
) -> dict[str, Any]:
    """Rename keys with the first matching rule (official -> ours, or ours -> official when ``reverse``).

    Keys no rule matches are kept as they are. Raises ``ValueError`` if two keys map to the same name.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new_key: str | None = key
        for rule in rules:
            matched, new_key = rule.apply(key, reverse=reverse)
            if matched:
                break
        if new_key is None:
            continue
        if new_key in out:
            raise ValueError(f"rename_state_dict: keys collide on {new_key!r} (from {key!r}).")
        out[new_key] = value
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def unwrap_checkpoint(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return the plain ``{name: tensor}`` state dict inside ``obj``.

    Accepts a state dict, or a dictionary wrapping one under one of :data:`CHECKPOINT_WRAPPER_KEYS`
    (possibly nested); strips a leading ``module.`` (DDP) prefix from every key.
    """
    current = obj
    for _ in range(len(CHECKPOINT_WRAPPER_KEYS) + 1):
        if _is_state_dict(current):
            break
        if not isinstance(current, Mapping):
            raise TypeError(
                f"{source}: expected a state dict or a checkpoint dictionary, got {type(current).__name__}."
            )
        inner = next((current[k] for k in CHECKPOINT_WRAPPER_KEYS if isinstance(current.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"{source}: not a state dict (some values are not tensors) and none of the wrapper keys "
                f"{list(CHECKPOINT_WRAPPER_KEYS)} holds one; top-level keys: {list(current)[:_MAX_KEYS_IN_ERROR]}."
            )
        current = inner
    else:
        raise ValueError(f"{source}: could not find a state dict inside the checkpoint.")
    if all(k.startswith(DDP_PREFIX) for k in current):
        current = {k[len(DDP_PREFIX) :]: v for k, v in current.items()}
    return dict(current)


def _short(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = len(keys) - _MAX_KEYS_IN_ERROR
    shown = ", ".join(keys[:_MAX_KEYS_IN_ERROR])
    return shown + (f", ... ({more} more)" if more > 0 else "")


def load_official_state_dict(
    model: nn.Module,
    path_or_state: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    source: str | None = None,
) -> Any:
    """Load a checkpoint written by the authors' code (or by this package) into ``model``.

    Args:
        model: the network (optionally wrapped in DataParallel/DDP). If its class defines
            ``convert_official_state_dict(state_dict)``, keys are converted with it first.
        path_or_state: a file path (read with ``torch.load(weights_only=True, map_location="cpu")``), a state dict,
            or a checkpoint dictionary holding one under ``state_dict``/``model``/``params``/``net``/... .
        strict: require that converted keys and the model's keys match exactly (and shapes agree).
        source: the name the error messages give an in-memory checkpoint (e.g. the file it was read from).

    Returns:
        the ``NamedTuple(missing_keys, unexpected_keys)`` of ``torch.nn.Module.load_state_dict``.

    Raises:
        FileNotFoundError: the path does not exist.
        KeyError: ``strict`` and keys are missing or unexpected (both lists are in the message).
        ValueError: a tensor's shape differs from the model's (the model was built with another config).
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        source = os.fspath(path_or_state)
        raw = load_weights_file(source)
    else:
        source = source or "path_or_state"
        raw = path_or_state
    state = unwrap_checkpoint(raw, source=source)
    net = unwrap(model)
    converter = getattr(net, "convert_official_state_dict", None)
    if callable(converter):
        state = converter(state)

    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise KeyError(
            f"load_official_state_dict({source}) into {type(net).__name__}: keys do not match after conversion.\n"
            f"  missing ({len(missing)}): {_short(missing)}\n  unexpected ({len(unexpected)}): {_short(unexpected)}"
        )
    bad_shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if bad_shapes:
        raise ValueError(
            f"load_official_state_dict({source}) into {type(net).__name__}: shape mismatch, the model was built "
            f"with another configuration than the checkpoint:\n  " + "\n  ".join(bad_shapes[:_MAX_KEYS_IN_ERROR])
        )
    return net.load_state_dict(state, strict=strict)


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict under the authors' key names (uses the class's ``to_official_state_dict``)."""
    net = unwrap(model)
    method = getattr(net, "to_official_state_dict", None)
    return dict(method()) if callable(method) else dict(net.state_dict())
