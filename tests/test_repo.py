"""Guards on the repository itself: CI runs the README's test line, nothing runs at import."""

import subprocess
import sys

from conftest import REPO


def test_ci_runs_the_readme_test_line():
    readme = (REPO / "README.md").read_text()
    assert "<!-- ci:test -->" in readme
    out = subprocess.run(["awk", '/<!-- ci:test -->/{f=1;next} f&&/^```bash/{g=1;next} g&&/^```/{exit} g{print}',
                          str(REPO / "README.md")], capture_output=True, text=True, check=True).stdout.strip()
    assert out == 'pip install -e ".[dev]" && pytest -q'
    ci = (REPO / ".ci" / "run").read_text()
    assert "ci:test" in ci and "RAY_AUTH_MODE=disabled" in ci and "RAY_USAGE_STATS_ENABLED=0" in ci
    assert '"$status" -eq 5' in ci


def test_import_is_side_effect_free():
    code = ("import sys, raysd, raysd.config, raysd.cli, raysd.data.imageset, raysd.data.sources, raysd.data.storage, "
            "raysd.run.rundir, raysd.run.verify; "
            "heavy = [m for m in ('ray', 'torch', 'diffusers', 'optuna') if m in sys.modules]; "
            "import logging; print(heavy, logging.getLogger('raysd').handlers)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[] []", out  # no heavy imports, no log handlers until the CLI sets them


def test_configuration_reference_is_generated_from_the_code():
    from raysd.config.reference import reference_markdown

    readme = (REPO / "docs" / "configuration.md").read_text()
    start, end = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"
    section = readme.split(start, 1)[1].split(end, 1)[0]
    assert section == reference_markdown(), "regenerate it: python -m raysd.config --readme docs/configuration.md"
