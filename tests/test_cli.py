"""Every command in the README's command table exists and answers --help (argparse, exit 0, usage text)."""
import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_modules() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = re.search(r"^## Commands\n(.*?)(?=^## )", readme, flags=re.S | re.M).group(1)
    return sorted(set(re.findall(r"^\| `python -m ([\w.]+)", table, flags=re.M)))


def test_the_table_lists_the_new_commands():
    mods = readme_modules()
    for m in ("convert.hf_to_nemo", "convert.nemo_to_hf", "benchmarks.model_eval", "benchmarks.inference_speed",
              "benchmarks.serve", "review_app", "review_app.screenshot"):
        assert m in mods, m


@pytest.mark.parametrize("module", readme_modules())
def test_help(module):
    mod = importlib.import_module(module if module != "review_app" else "review_app.__main__")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0 and "usage:" in out.getvalue(), module


def test_print_line_writes_the_line_and_its_newline_at_once(monkeypatch):
    """Ranks sharing one stdout interleave at write boundaries; `print` writes the text and the newline apart."""
    from recipes.cli import print_line

    class Recorder(io.StringIO):
        def __init__(self):
            super().__init__()
            self.writes = []

        def write(self, s):
            self.writes.append(s)
            return super().write(s)

    out = Recorder()
    monkeypatch.setattr("sys.stdout", out)
    print("before", end="")
    print_line("done: /tmp/run")
    assert [w for w in out.writes if w] == ["before", "done: /tmp/run\n"]
    assert out.getvalue() == "beforedone: /tmp/run\n"
