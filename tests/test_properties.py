"""Property-based tests of the input boundaries (hypothesis): `maml.Task`'s shape checks, the episode
sampler's argument checks and the config parsers (the command line, config.json) get random valid and
invalid inputs. Every valid one is accepted; every invalid one is a one-line `ValueError` naming the
value, never an error from deep inside JAX or NumPy. 40 examples a test (MAML_HYPOTHESIS_EXAMPLES=3000 for a
longer search: it passed on 2026-12-01)."""

from __future__ import annotations

import math
import os
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import maml
from data.episodes import ROTATIONS, episode_sampler
from experiments import cli, config_tree, sinusoid

FEW = settings(max_examples=int(os.environ.get("MAML_HYPOTHESIS_EXAMPLES", 40)), deadline=None,
               suppress_health_check=[HealthCheck.too_slow])


def one_line_value_error(fn) -> str:
    """The message of the `ValueError` that `fn()` raises (it must raise one, on one line)."""
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    assert message and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------ Task

shapes = st.lists(st.integers(0, 3), max_size=3).map(tuple)
not_arrays = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.integers(), max_size=3))
leaves = st.one_of(shapes.map(lambda s: jnp.zeros(s)), not_arrays)


@FEW
@given(leaves, leaves, leaves, leaves)
def test_task_accepts_matching_example_counts_and_names_any_other_input(sx, sy, qx, qy):
    args = (sx, sy, qx, qy)
    if pair_ok(sx, sy) and pair_ok(qx, qy):
        task = maml.Task(*args)
        assert task.support_x is sx and task.query_y is qy
        return
    message = one_line_value_error(lambda: maml.Task(*args))
    x, y = (sx, sy) if not pair_ok(sx, sy) else (qx, qy)  # the pair at fault (support is checked first)
    bad = [a for a in (x, y) if not isinstance(a, jax.Array)]
    if bad:
        assert message.startswith("Task: ") and f"is a {type(bad[0]).__name__}; expected an array" in message, message
    else:  # it names both shapes
        assert message.startswith("Task: ") and f"{tuple(x.shape)}" in message and f"{tuple(y.shape)}" in message


def pair_ok(x, y) -> bool:
    return isinstance(x, jax.Array) and isinstance(y, jax.Array) and x.ndim >= 1 and y.ndim >= 1 and \
        x.shape[0] == y.shape[0]


# ------------------------------------------------------------------------------------------------ episodes

image_shapes = st.lists(st.integers(0, 5), min_size=2, max_size=6).map(tuple)
BAD_COUNTS = st.one_of(st.integers(-3, 0), st.booleans(), st.floats(0, 4), st.none(), st.just("3"))


@st.composite
def episode_args(draw) -> tuple[tuple[int, ...], dict, bool]:
    """An images shape, counts (half the time one of them replaced by a bad value) and `rotate`."""
    counts = {"ways": draw(st.integers(1, 6)), "shots": draw(st.integers(1, 4)), "queries": draw(st.integers(0, 4)),
              "num_tasks": draw(st.integers(1, 3))}
    if draw(st.booleans()):
        counts[draw(st.sampled_from(sorted(counts)))] = draw(BAD_COUNTS)
    return draw(image_shapes), counts, draw(st.booleans())


LOWEST = {"ways": 1, "shots": 1, "queries": 0, "num_tasks": 1}


def is_count(v, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


@FEW
@given(episode_args())
def test_episode_sampler_draws_valid_episodes_and_names_any_bad_argument(args):
    shape, counts, rotate = args
    make = lambda: episode_sampler(np.zeros(shape, np.uint8), **counts, rotate=rotate)
    if len(shape) not in (4, 5):
        assert f"images has shape {shape}" in one_line_value_error(make)
        return
    bad = [f"{name}={v!r}" for name, v in counts.items() if not is_count(v, LOWEST[name])]
    if bad:
        message = one_line_value_error(make)
        assert any(b in message for b in bad), message
        return
    ways, shots, queries, tasks = (counts[k] for k in ("ways", "shots", "queries", "num_tasks"))
    if ways > shape[0] * (ROTATIONS if rotate else 1) or shots + queries > shape[1]:
        message = one_line_value_error(make)
        assert f"ways={ways}" in message or f"{shots} + {queries}" in message, message
        return
    if min(shape[2:4]) < 1 or (rotate and shape[2] != shape[3]):  # no pixels, or rotations of non-square images
        assert f"images has shape {shape}" in one_line_value_error(make)
        return
    task = jax.eval_shape(make(), jax.random.PRNGKey(0))
    example = (*shape[2:4], shape[4] if len(shape) == 5 else 1)
    assert task.support_x.shape == (tasks, ways * shots, *example)
    assert task.query_y.shape == (tasks, ways * queries)


# ------------------------------------------------------------------------------------------------ config parsers

CONFIG, ALGORITHMS = sinusoid.SinusoidConfig, sinusoid.algorithms
_DEFAULTS = config_tree.registry_defaults(CONFIG, ALGORITHMS)
LEAVES = [leaf for leaf in [*config_tree.leaves(CONFIG), *config_tree.algorithm_leaves("maml", _DEFAULTS["maml"])]
          if leaf.type is not bool]  # (booleans are --flag / --no-flag, without a value)
RULES = {leaf.key: leaf.owner.__dataclass_fields__[leaf.name].metadata.get("rule") for leaf in LEAVES}
NUMBERS = (int, float)

raw_values = st.one_of(
    st.integers(-3, 10 ** 12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.lists(st.integers(-2, 50), min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))),
    st.text(st.characters(codec="utf-8", exclude_characters="-"), max_size=8),
)


def expected(leaf: config_tree.Leaf, raw: str):
    """`(value, ok)`: `raw` converted to the leaf's type and whether its rule holds; `(raw, False)` if it does not
    convert. Only for int / float / Optional leaves with a rule (the others: `(None, None)`, not predicted)."""
    optional = typing.get_origin(leaf.type) is typing.Union
    tp = next(a for a in typing.get_args(leaf.type) if a is not type(None)) if optional else leaf.type
    rule = RULES[leaf.key]
    if typing.get_origin(tp) is tuple:  # named as the parsed tuple; validity not predicted
        try:
            return tuple(int(p) for p in raw.split(",")), None
        except ValueError:
            return None, None
    if tp not in NUMBERS or rule is None:
        return None, None
    if optional and raw.lower() == "none":
        return None, True
    try:
        value = tp(raw)
    except ValueError:
        return raw, False
    if not math.isfinite(value):  # inf, nan: no count, rate or seed
        return value, False
    if leaf.key == "seed":  # what a JAX key holds: 32 bits
        return value, 0 <= value < 2 ** 32
    return value, bool(rule.ok(value))


@FEW
@given(st.sampled_from(LEAVES), raw_values)
def test_command_line_accepts_valid_values_and_names_any_invalid_one(leaf, raw):
    parse = lambda: cli.parse(CONFIG, [leaf.flag, raw], ALGORITHMS)
    value, ok = expected(leaf, raw)
    try:
        parsed = parse()
    except ValueError as e:  # FlagError, or a check across flags (--num-processes needs --coordinator)
        message = str(e)
        assert "\n" not in message and leaf.flag in message, message
        assert repr(raw) in message or raw in message or (value is not None and repr(value) in message), message
        assert ok is not True, f"{leaf.flag} {raw!r} is valid, but: {message}"
        return
    assert ok is not False, f"{leaf.flag} {raw!r} is invalid, but parsed"
    got = config_tree.to_flat(parsed)[leaf.key]
    if ok:
        assert got == value or (isinstance(value, float) and math.isclose(got, value))


json_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(-2, 2), st.text(max_size=4),
                        st.lists(st.integers(-1, 3), max_size=2))


@FEW
@given(st.sampled_from([leaf for leaf in config_tree.all_leaves(CONFIG, ALGORITHMS).values() if leaf.key != "algorithm"]),
       json_values)
def test_config_json_values_of_the_wrong_type_or_out_of_range_are_one_line(leaf, value):
    """A run's config.json, as `experiments.runs` reads it back: any value is accepted or named in one line."""
    algorithm = next(n for n, v in _DEFAULTS.items() if leaf.key in {l.key for l in config_tree.algorithm_leaves(n, v)}) \
        if leaf.owner is not CONFIG and leaf.path == ("algorithm",) else "maml"
    flat = {"algorithm": algorithm, leaf.key: value}
    try:
        built = config_tree.from_flat(CONFIG, flat, ALGORITHMS, where="config.json")
    except ValueError as e:
        message = str(e)
        assert "\n" not in message and (leaf.key in message or leaf.flag in message), message
        assert repr(value) in message or repr(tuple(value) if isinstance(value, list) else value) in message, message
        return
    assert config_tree.to_flat(built)[leaf.key] == (float(value) if leaf.type is float and value is not None else value)
