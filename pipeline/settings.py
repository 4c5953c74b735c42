"""Config values as plain Python: the one helper every room uses to hand settings to code that
should not know about OmegaConf (method settings, cache keys, ``instantiate`` keyword arguments)."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf


def plain(value: Any) -> Any:
    """A config node (or any value) as plain Python: dicts, lists and scalars, interpolations resolved."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
