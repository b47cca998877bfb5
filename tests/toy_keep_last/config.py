"""(1) The config of keep-last."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from accel.configs import ConfigError, MethodConfig, register_config


@register_config
@dataclass
class KeepLastConfig(MethodConfig):
    """Keep the last N tokens: each query attends to at most n cached tokens.

    n: tokens each query attends: the first sink ones and the last n - sink (context <= n is dense)
    sink: first tokens always attended, counted inside n
    """

    method: ClassVar[str] = "keep-last"
    version: ClassVar[int] = 1

    n: int = 64
    sink: int = 0

    def validate(self) -> None:
        if self.n < 1:
            raise ConfigError(f"keep-last: n must be >= 1, got {self.n}")
        if not 0 <= self.sink < self.n:
            raise ConfigError(f"keep-last: sink must be in [0, n={self.n}), got {self.sink}")
