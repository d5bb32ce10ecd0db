"""docs/outputs.md's "Using the trained model" snippets, run as written on a short run's output:
the loaded model predicts digits as preprocessed in training, and evaluating it on the
server's test set rebuilt from history.json's config gives the run's final centralized
metrics again."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs a Flower simulation

ROOT = Path(__file__).resolve().parent.parent


def readme_snippets() -> list[str]:
    """The python blocks of docs/outputs.md's "Using the trained model" section."""
    readme = (ROOT / "docs" / "outputs.md").read_text(encoding="utf-8")
    section = readme.split("## Using the trained model\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    subprocess.run([sys.executable, "run_simulation.py", "--num-supernodes", "2", "--out",
                    str(out), "--run-config", "num-server-rounds=2 local-epochs=2"],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    return out


def test_the_readme_snippets_load_the_model_and_reproduce_its_test_metrics(short_run):
    snippets = readme_snippets()
    assert len(snippets) == 2 and all("outputs/main" in code for code in snippets)
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for code in snippets:
            exec(code.replace("outputs/main", str(short_run)), namespace)  # noqa: S102
    predicted = namespace["probabilities"].argmax(axis=1)
    assert (predicted == namespace["labels"]).mean() > 0.7
    final = json.loads((short_run / "history.json").read_text())["rounds"][-1]["centralized"]
    assert namespace["accuracy"] == pytest.approx(final["accuracy"], abs=1e-4)
    assert namespace["loss"] == pytest.approx(final["loss"], rel=1e-3)
    assert printed.getvalue().startswith("predicted [")
