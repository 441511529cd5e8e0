"""The README and docs/ as a user reads them: every documented script answers --help, every flag a
documented command passes is one the script knows, and every relative link points at a file."""
import glob
import importlib
import os
import re
import shlex
import sys

import pytest

import train_jem
from cli import UsageError
from conftest import REPO

DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


def shell_lines(path):
    """The lines of a document's bash blocks (continuation lines joined), then its inline commands
    (`python ...`)."""
    text = open(path).read()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        yield from block.replace("\\\n", " ").splitlines()
    yield from re.findall(r"`(python [^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def documented_commands():
    """(document, script, arguments) for every `python SCRIPT.py ...`, `python -m tools.NAME ...`
    and torchrun line, with shell variables (R="--preset ...", then $R) expanded; the arguments
    after bench's `--` are train_jem.py's."""
    found = []
    for path in DOCS:
        variables = {}
        for line in shell_lines(path):
            line = line.split(" #")[0].strip()
            variable = re.match(r'^([A-Z]+)="(.*)"$', line)
            if variable:
                variables[variable.group(1)] = variable.group(2)
                continue
            line = re.sub(r"\$([A-Z]+)\b", lambda m: variables.get(m.group(1), m.group(0)), line)
            try:
                words = shlex.split(line)
            except ValueError:
                continue
            for i, word in enumerate(words):
                if word.endswith(".py") and os.path.isfile(os.path.join(REPO, word)) or \
                        word == "-m" and i + 1 < len(words) and os.path.isfile(
                            os.path.join(REPO, words[i + 1].replace(".", "/") + ".py")):
                    script = words[i + 1].replace(".", "/") + ".py" if word == "-m" else word
                    rest = words[i + 1:]
                    mine = rest[:rest.index("--")] if "--" in rest else rest
                    found.append((path, script, mine[1:] if word == "-m" else mine))
                    if "--" in rest:  # bench.py passes what follows `--` to train_jem.py
                        found.append((path, "train_jem.py", rest[rest.index("--") + 1:]))
                    break
    return found


def help_text(script, capsys, monkeypatch):
    """The script's --help as a user gets it, from its main() in this process: a process per script
    spent most of a minute importing torch again, fourteen times."""
    module = importlib.import_module(script[:-3].replace("/", "."))
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        module.main()
    assert stop.value.code == 0, f"{script} --help failed: {capsys.readouterr().err[-500:]}"
    return capsys.readouterr().out


def test_documented_commands_use_real_scripts_and_flags(capsys, monkeypatch):
    commands = documented_commands()
    scripts = {script for _, script, _ in commands}
    assert {"train_jem.py", "sample.py", "eval_jem.py", "tools/train_classifier.py"} <= scripts
    helps = {script: help_text(script, capsys, monkeypatch) for script in sorted(scripts)}
    unknown = sorted({(os.path.relpath(path, REPO), script, flag) for path, script, words in commands
                      for flag in flags_of(words) if not re.search(re.escape(flag) + r"\b", helps[script])})
    assert not unknown, f"documented flags the scripts do not know: {unknown}"


def flags_of(words):
    return [w.split("=")[0] for w in words if w.startswith("--")]


def test_documented_training_commands_pass_the_flag_checks():
    """Every documented train_jem.py command (resumes and --help aside) gets past the checks that
    refuse impossible flag combinations, e.g. a baseline that turns the learned temperature off
    while its preset refits it."""
    commands = [(path, words) for path, script, words in documented_commands()
                if script == "train_jem.py" and not {"--resume", "--help", "-h"} & set(words)]
    assert len(commands) > 20
    for path, words in commands:
        cfg, _ = train_jem.resolve_config(words)
        try:
            train_jem.check_flags(cfg)
        except UsageError as e:
            pytest.fail(f"{os.path.relpath(path, REPO)}: {shlex.join(words)}: {e}")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(path):
    text = open(path).read()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) + re.findall(r'src="([^"]+)"', text)
    missing = [l for l in links if "://" not in l
               and not os.path.exists(os.path.join(os.path.dirname(path), l))]
    assert not missing, f"{os.path.relpath(path, REPO)} links to missing files: {missing}"
