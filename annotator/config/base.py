"""Shared pieces of the configuration tree: the error type, the section base, moved-field refusals."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the offending field."""


def refuse_moved(data: Any, **moved: str) -> Any:
    """A config section's validator for fields that moved: the message says where to."""
    if isinstance(data, dict):
        for field, message in moved.items():
            if field in data:
                raise ValueError(message)
    return data


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
