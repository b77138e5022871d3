"""The README and docs/ hold commands a reader copies: each one parses with raysd's own parser and its
settings resolve (a renamed flag or setting fails here, not in a user's terminal); the README stays
a five-minute read, and its links lead somewhere."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "jobs" / "README.md",
         REPO / "cluster" / "README.md"]
JOB = re.compile(r"python jobs/(\w+)\.py")  # a `ray job submit` entrypoint forwards to its command


def _commands(text: str) -> list[str]:
    """raysd command lines: in bash blocks (continuation lines joined) and in inline code spans;
    synopses with [optional] or a|b alternatives are left out (they are not commands)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line.split(" #", 1)[0].strip())
    # inline: a command with its flags (a bare `raysd verify` names the command, it is no command line)
    found += [c for c in re.findall(r"`(raysd [^`]+)`", text.replace("\n", " ")) if " -" in c]
    out = []
    for c in found:
        m = JOB.search(c)
        if m:  # python jobs/NAME.py ARGS -> raysd NAME ARGS
            c = f"raysd {m.group(1).replace('_', '-')} " + c[m.end():]
        c = c.split("&&")[-1].strip()
        if c.startswith("raysd ") and not re.search(r"[\[|<]|\.\.\.", c):
            out.append(" ".join(c.split()))
    return out


def _all_commands() -> list[tuple[str, str]]:
    return [(p.relative_to(REPO).as_posix(), c) for p in PAGES if p.exists() for c in _commands(p.read_text())]


def test_the_pages_hold_commands():
    cmds = _all_commands()
    pages = {p for p, _ in cmds}
    assert {"README.md", "docs/datasets.md", "docs/method.md", "docs/commands.md"} <= pages, pages
    readme = [c for p, c in cmds if p == "README.md"]
    assert "raysd run" in readme and any("--preset paper" in c for c in readme)


@pytest.mark.parametrize("page,command", _all_commands())
def test_every_documented_command_parses(page, command, tmp_path):
    from raysd.cli import build_parser
    from raysd.commands import config_from_args

    argv = shlex.split(command)[1:]
    if argv in (["--help"], ["--version"]):
        return
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{page}: `{command}` does not parse (exit {e.code})")
    if hasattr(args, "set") and not (argv[0] == "config" and args.reference):
        if "://" in (getattr(args, "run_dir", None) or ""):  # an object store: resolved as a local run directory
            args.run_dir = str(tmp_path / "run")
        config_from_args(args)  # every --set key and value, the preset and the named flags resolve


def test_the_readme_is_a_short_read_and_its_links_lead_somewhere():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) < 150
    for page in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: link to {target} leads nowhere"
