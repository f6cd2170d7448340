"""Evaluators, declared in the config and built here (big_vision's pattern).

Each entry `config.evals.NAME` is a ConfigDict with
  type   the module: `capture_jax.evaluators.<type>`, or a dotted module path of your own;
  every  steps between runs, plus once at the end; 0 = at the end only; -1 = never;
and the evaluator's own fields. The module defines `Evaluator(experiment, **fields)` (it checks its
fields there, so a bad config fails before training) with
`evaluate(model_state, step) -> Iterable[(name, value)]`. The trainer writes each pair as the
scalar `NAME/name`; an evaluator writes its own files under `experiment.workdir`, and may define
`summary(values) -> list[str]`: its lines in the run's final summary, from its latest values.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Iterable
from typing import Any, Protocol

_RESERVED_FIELDS = ("type", "every")


class Evaluator(Protocol):
    """What a module's `Evaluator` class provides."""

    def evaluate(self, model_state: Any, step: int) -> Iterable[tuple[str, float]]:
        ...


@dataclasses.dataclass
class Scheduled:
    """An evaluator of `config.evals` with its name and schedule."""

    name: str
    every: int
    evaluator: Evaluator
    latest: dict[str, float] = dataclasses.field(default_factory=dict)  # Its last values.

    def evaluate(self, model_state: Any, step: int) -> list[tuple[str, float]]:
        """`(NAME/name, value)` pairs of one run."""
        self.latest = {k: float(v) for k, v in self.evaluator.evaluate(model_state, step)}
        return [(f"{self.name}/{k}", v) for k, v in self.latest.items()]

    def summary(self) -> list[str]:
        """The evaluator's lines for the final summary (none before it has run)."""
        lines = getattr(self.evaluator, "summary", None)
        return list(lines(self.latest)) if lines and self.latest else []


def _module(name: str, kind: str):
    path = kind if "." in kind else f"capture_jax.evaluators.{kind}"
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as e:
        if e.name is None or not path.startswith(e.name):
            raise  # A module that exists but fails to import something else.
        raise ValueError(f"config.evals.{name}.type={kind!r}: there is no module {path}; use a "
                         "module of capture_jax/evaluators/ or a dotted module path.") from None
    if not hasattr(module, "Evaluator"):
        raise ValueError(f"config.evals.{name}.type={kind!r}: module {path} defines no "
                         "`Evaluator` class.")
    return module


def create(experiment, *, scheduled_only: bool = False) -> list[Scheduled]:
    """The evaluators of `experiment.config.evals`, in config order; with `scheduled_only`, not
    those with every < 0 (the trainer's choice; `main.py --mode=evaluate` runs them all)."""
    built = []
    for name, entry in experiment.config.get("evals", {}).items():
        missing = [f for f in _RESERVED_FIELDS if f not in entry]
        if missing:
            raise ValueError(f"config.evals.{name} lacks {missing}: give its type (an evaluator "
                             "module) and every (steps between runs, 0 = at the end, -1 = never).")
        if scheduled_only and entry["every"] < 0:
            continue
        cls = _module(name, entry["type"]).Evaluator
        fields = {k: v for k, v in entry.items() if k not in _RESERVED_FIELDS}
        params = inspect.signature(cls).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            unknown = sorted(set(fields) - set(params))
            if unknown:
                raise ValueError(f"config.evals.{name} has fields {unknown} that its evaluator "
                                 f"({entry['type']}) does not take: remove them or fix the names.")
        required = [n for n, p in list(params.items())[1:] if p.default is p.empty
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        absent = [n for n in required if n not in fields]
        if absent:
            raise ValueError(f"config.evals.{name} lacks the fields {absent} that its evaluator "
                             f"({entry['type']}) needs: add them.")
        built.append(Scheduled(name, int(entry["every"]), cls(experiment, **fields)))
    return built
