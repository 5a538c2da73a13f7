"""The shared folders (../shared/golden, ../shared/data) never let tests pass by skipping under CI.

Each case runs pytest in a subprocess on a real test that needs a folder, with the folder's variable pointing
to an empty one: with CI=true the run fails and names the folder; without CI it passes with a skip whose
reason names the folder. Covered paths: a fixture (golden), a collection-time parametrisation over the golden
files (sharedkit.golden_params), and the shared data folder (raccoon_dir).
"""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from sharedkit import REPO

CASES = {  # name: (variable, test node that needs the folder)
    "golden fixture": ("NANODET_GOLDEN_DIR", "tests/model/test_losses.py::test_settings"),
    "golden files at collection": ("NANODET_GOLDEN_DIR", "tests/model/test_golden.py::test_every_golden_file_passes"),
    "shared data": ("NANODET_SHARED_DATA_DIR",
                    "tests/foundation/test_shared_fixtures.py::test_raccoon_annotations_pair_with_images"),
}


def _pytest(node: str, env_var: str, folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST")}
    env.update({env_var: str(folder), "OMP_NUM_THREADS": "1"})
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", node],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def _run_with_empty_folder(case: str, tmp_path: Path, ci: str | None) -> tuple[str, Path, int, str]:
    """The case's test node run with its shared folder pointing at an empty one: (variable, folder, exit
    code, output)."""
    env_var, node = CASES[case]
    empty = tmp_path / "empty"
    empty.mkdir()
    res = _pytest(node, env_var, empty, ci=ci)
    return env_var, empty, res.returncode, res.stdout + res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_missing_shared_folder_fails_under_ci(case, tmp_path):
    env_var, empty, code, output = _run_with_empty_folder(case, tmp_path, ci="true")
    assert code != 0, f"{case}: CI=true and {env_var}={empty} (empty) passed:\n{output[-3000:]}"
    assert str(empty) in output and env_var in output, output[-3000:]
    assert "CI=true" in output and "not a skip" in output, output[-3000:]
    assert " passed" not in output.splitlines()[-1], output[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_missing_shared_folder_skips_with_the_reason_outside_ci(case, tmp_path):
    env_var, empty, code, output = _run_with_empty_folder(case, tmp_path, ci=None)
    assert code == 0, f"{case}: exit {code} without CI:\n{output[-3000:]}"
    skipped = [ln for ln in output.splitlines() if ln.startswith("SKIPPED")]
    assert skipped and all(str(empty) in ln and env_var in ln for ln in skipped), output[-3000:]
    assert "skipped" in output.splitlines()[-1] and "passed" not in output.splitlines()[-1], output[-3000:]


@pytest.mark.parametrize("value, expected", [("true", True), ("True", True), ("1", True), ("yes", True),
                                             ("false", False), ("0", False), ("", False), (None, False)])
def test_ci_values(monkeypatch, value, expected):
    from sharedkit import in_ci

    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert in_ci() is expected


def test_raccoon_annotations_pair_with_images(raccoon_dir):
    """The shared raccoon set as its README describes it: 200 VOC XML files, each naming an image that
    exists, with at least one raccoon box inside the annotated size."""
    xmls = sorted((raccoon_dir / "annotations").glob("*.xml"))
    assert len(xmls) == 200, f"{raccoon_dir / 'annotations'}: {len(xmls)} XML files, expected 200"
    boxes = 0
    for xml in xmls:
        root = ET.parse(xml).getroot()
        image = raccoon_dir / "images" / root.findtext("filename")
        assert image.is_file(), f"{xml}: names {image}, which does not exist"
        width, height = int(root.findtext("size/width")), int(root.findtext("size/height"))
        objects = root.findall("object")
        assert objects, f"{xml}: no object"
        for obj in objects:
            assert obj.findtext("name") == "raccoon", f"{xml}: class {obj.findtext('name')!r}"
            x1, y1, x2, y2 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
            assert 0 <= x1 < x2 <= width + 1 and 0 <= y1 < y2 <= height + 1, (xml, x1, y1, x2, y2, width, height)
        boxes += len(objects)
    assert boxes == 217
