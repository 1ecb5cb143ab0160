"""The README's snippet runs exactly as printed, and the CI runs the README's test command."""

import re

import jax


def readme(repo_root):
    return (repo_root / "README.md").read_text()


def test_snippet_meta_trains_a_model_of_your_own(repo_root, capsys):
    text = readme(repo_root)
    section = text.split("## Use the meta-gradient module in your own code", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    state, maml, my_tasks, inner = namespace["state"], namespace["maml"], namespace["my_tasks"], namespace["inner"]
    assert int(state.step) == 500
    held_out = my_tasks(jax.random.PRNGKey(10_000))
    Net = namespace["Net"]
    before = jax.vmap(lambda t: maml.meta_loss(Net(jax.random.PRNGKey(0)), t, inner))(held_out).mean()
    after = jax.vmap(lambda t: maml.meta_loss(state.model, t, inner))(held_out).mean()
    assert after < 0.5 * before, (before, after)
    assert "meta-loss" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command(repo_root):
    setup = readme(repo_root).split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"^    (pip install .*)$", setup, re.M)
    assert commands == ["pip install -e . && python -m experiments.sinusoid", "pip install -e '.[dev]' && pytest"]
    assert commands[1] in (repo_root / ".ci" / "run").read_text()
