"""Every ```python block of README.md runs (issue 15): the recipes are tested code. A block that
imports an optional package (torch_geometric, torchvision, timm) is skipped where it does not
import."""
import importlib.util
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
OPTIONAL = ("torch_geometric", "torchvision", "timm")


def _blocks():
    text = README.read_text()
    out = []
    for i, m in enumerate(re.finditer(r"```python\n(.*?)```", text, re.S)):
        heading = re.findall(r"^#+ (.+)$", text[:m.start()], re.M)
        name = re.sub(r"\W+", "-", heading[-1] if heading else "top").strip("-").lower()
        out.append(pytest.param(m.group(1), id=f"{i}-{name}"))
    return out


@pytest.mark.parametrize("code", _blocks())
def test_readme_block_runs(code):
    for mod in OPTIONAL:
        if re.search(rf"^\s*(import|from) {mod}\b", code, re.M) and \
                importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed")
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
