"""Smoke tests of the demo (``examples/digits_demo.py``) and the MIL evaluation
(``bench/mil_digits.py``) in their ``--quick`` configurations.

Both scripts are imported and their ``main(argv)`` called in this process (saves the ~3-5 s of
importing torch, scikit-learn and matplotlib again per script); together they take ~10 s of CPU.
"""
import importlib.util
import json
import math
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def load_script(rel_path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, rel_path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod   # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def table_rows(text: str):
    """Body rows of the Markdown tables in ``text`` as lists of cell strings."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return [r for r in rows if not r[0].lower().startswith("pooling")]


def test_digits_demo_quick_trains_and_saves_the_plan_figure(tmp_path, capsys):
    demo = load_script("examples/digits_demo.py", "digits_demo")
    out = tmp_path / "sub" / "plans.png"
    assert demo.main(["--quick", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert out.is_file() and out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000

    rows = table_rows(captured.out)
    assert [r[0] for r in rows] == [name for name, _, _ in demo.QUICK_RUNS]
    for name, acc, sec in rows:
        acc, sec = float(acc), float(sec)
        # 450 test images: accuracy is a multiple of 1/450 in [0, 1]
        assert 0.0 <= acc <= 1.0 and abs(acc * 450 - round(acc * 450)) < 0.5 + 1e-9, (name, acc)
        assert sec > 0.0
    # progress: one line per (configuration, epoch) on stderr
    assert len(re.findall(r"epoch\s+1/1", captured.err)) == len(demo.QUICK_RUNS)
    # the figure's plans pool to exactly what the layer outputs (same problem, same weights)
    diff = float(re.search(r"plan check: .* = ([0-9.e+-]+)", captured.err).group(1))
    assert diff <= 1e-4


def test_mil_digits_quick_writes_table_json_and_plot(tmp_path, capsys):
    mil = load_script("bench/mil_digits.py", "mil_digits")
    assert mil.main(["--quick", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    for ext in ("md", "json", "png"):
        assert (tmp_path / f"mil_digits.{ext}").is_file()
    assert (tmp_path / "mil_digits.png").read_bytes()[:8] == PNG_MAGIC

    data = json.loads((tmp_path / "mil_digits.json").read_text())
    cfg = data["config"]
    assert cfg["quick"] and cfg["folds"] == 2
    keys = [r["key"] for r in data["results"]]
    assert keys == ["mean", "attention", "rotp-be-exact"]
    for r in data["results"]:
        assert len(r["accs"]) == cfg["folds"]
        for a in r["accs"]:
            assert isinstance(a, float) and math.isfinite(a) and 0.0 <= a <= 1.0
            # each test fold has bags_per_fold bags: accuracy is a multiple of 1/bags_per_fold
            n = cfg["bags_per_fold"]
            assert abs(a * n - round(a * n)) < 1e-9, (r["key"], a)
        assert r["mean"] == pytest.approx(sum(r["accs"]) / len(r["accs"]))
        assert 0.0 <= r["std"] <= 0.5 and r["finite_loss"]

    md = (tmp_path / "mil_digits.md").read_text()
    rows = table_rows(md)
    assert [row[0] for row in rows] == [r["label"] for r in data["results"]]
    for row, r in zip(rows, data["results"]):
        assert row[1] == f"{r['mean']:.3f} ± {r['std']:.3f}"
    assert table_rows(captured.out) == rows     # the printed table is the written one


def test_mil_digits_bags_follow_the_recipe():
    """Bags: half positive, positive iff the target digit is in the bag, sizes >= 2, and no
    image shared between folds (test bags never see a training image)."""
    import numpy as np
    import torch

    mil = load_script("bench/mil_digits.py", "mil_digits_bags")
    folds = mil.make_fold_bags(3, 20, target=9, mean_size=10, std_size=2, seed=0)
    from sklearn.datasets import load_digits
    d = load_digits()
    images = torch.from_numpy((d.images / 16.0).astype(np.float32))
    seen = []
    for bags in folds:
        assert bags.num_bags == 20 and int(bags.labels.sum()) == 10
        assert int(bags.sizes.min()) >= 2 and int(bags.sizes.sum()) == bags.images.shape[0]
        assert torch.equal(bags.images[:, 0], images[bags.source])
        assert torch.equal(bags.index, torch.repeat_interleave(torch.arange(20), bags.sizes))
        digit = torch.from_numpy(d.target)[bags.source]
        has_target = torch.zeros(bags.num_bags).index_add_(0, bags.index, (digit == 9).float())
        assert torch.equal(has_target > 0, bags.labels > 0)
        seen.append(set(bags.source.tolist()))
    for i in range(len(seen)):
        for j in range(i + 1, len(seen)):
            assert not (seen[i] & seen[j])
