"""`Task`: one few-shot task (a support set to adapt on, a query set to evaluate on) as a pytree."""

from __future__ import annotations

import equinox as eqx
from jaxtyping import Array, Shaped


def _short(value: object) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def _check_pair(name: str, x: Array, y: Array, axis: int) -> None:
    for part, value in (("x", x), ("y", y)):
        if not (hasattr(value, "shape") and hasattr(value, "ndim")):
            raise ValueError(f"Task: {name}_{part}={_short(value)} is a {type(value).__name__}; expected an array "
                             f"(examples along axis {axis})")
    if x.ndim <= axis or y.ndim <= axis:
        raise ValueError(
            f"Task: {name}_x has shape {tuple(x.shape)} and {name}_y has shape {tuple(y.shape)}; "
            f"expected at least {axis + 1} axes (examples first)"
        )
    if x.shape[axis] != y.shape[axis]:
        raise ValueError(
            f"Task: {name}_x has {x.shape[axis]} examples but {name}_y has {y.shape[axis]} "
            f"(shapes {tuple(x.shape)} and {tuple(y.shape)}); expected the same number along axis {axis}"
        )


class Task(eqx.Module):
    """Support and query sets of one task, or of a batch of tasks (then every leaf has a leading task axis).

    Shapes for one task: `support_x [S, *x]`, `support_y [S, *y]`, `query_x [Q, *x]`, `query_y [Q, *y]`.
    A batch of B tasks adds a leading axis B to all four; `check_batch` validates that form.
    """

    support_x: Shaped[Array, "S ..."]
    support_y: Shaped[Array, "S ..."]
    query_x: Shaped[Array, "Q ..."]
    query_y: Shaped[Array, "Q ..."]

    def __check_init__(self):
        _check_pair("support", self.support_x, self.support_y, 0)
        _check_pair("query", self.query_x, self.query_y, 0)

    @property
    def num_tasks(self) -> int:
        """Leading axis length, for a batch of tasks."""
        return self.support_x.shape[0]


def check_batch(tasks: Task) -> int:
    """Check that `tasks` is a batch of tasks (leading task axis on every leaf); return the batch size."""
    if not isinstance(tasks, Task):
        raise ValueError(f"tasks: expected a maml.Task, got {type(tasks).__name__}")
    b = tasks.support_x.ndim and tasks.support_x.shape[0]
    for name in ("support_x", "support_y", "query_x", "query_y"):
        leaf = getattr(tasks, name)
        if leaf.ndim < 2 or leaf.shape[0] != b:
            raise ValueError(
                f"tasks: {name} has shape {tuple(leaf.shape)}; expected a leading task axis of {b} "
                "shared by support_x, support_y, query_x, query_y"
            )
    _check_pair("support", tasks.support_x, tasks.support_y, 1)
    _check_pair("query", tasks.query_x, tasks.query_y, 1)
    return b
