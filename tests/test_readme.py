"""The README's commands and its quickstart snippet are what we test and run."""

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_snippet_runs():
    block = README.split("<!-- quickstart:start -->")[1].split(
        "<!-- quickstart:end -->"
    )[0]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README quickstart", "exec"), {})
    assert out.getvalue().strip() == "50.0"


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.findall(r"```bash\n(python3 -m venv .*?)\n```", README)
    assert len(commands) == 2, commands
    demo, tests = commands
    assert "optax_clip.demo" in demo and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_every_public_function_is_in_the_transforms_table():
    import optax_clip

    table = README.split("## Transforms")[1].split("\n## ")[0]
    functions = [n for n in optax_clip.__all__ if n[0].islower() and n != "get_stats"]
    missing = [n for n in functions if f"`{n}" not in table]
    assert not missing, f"README's transform table lacks {missing}"
