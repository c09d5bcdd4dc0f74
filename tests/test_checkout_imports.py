"""From the checkout's root (first on `sys.path` under `python3 -m pytest`, `python3 -c` and
scripts run there) nothing of ours hides an installed package: the top-level `kernels/` folder
is installed as `spin_ray.kernels` and never answers `import kernels`, which is Hugging Face's
package (transformers imports it when its Llama classes load). The README's Python example runs
from the root."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_from_root(code: str, tmp_path: Path) -> str:
    env = {**os.environ, "SPIN_RAY_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_kernels_from_the_root_is_hugging_faces_and_ours_is_spin_ray_kernels(tmp_path):
    out = _run_from_root(
        "import sys, kernels, spin_ray.kernels.rope as ours\n"
        "assert sys.path[0] == ''  # the checkout's root, as under python3 -m pytest\n"
        "print(kernels.__file__)\n"
        "print(ours.__file__)\n"
        "print(hasattr(kernels, 'get_kernel'))\n",
        tmp_path,
    )
    theirs, ours, is_hf = out.splitlines()
    assert not Path(theirs).resolve().is_relative_to(ROOT), theirs
    assert Path(ours).resolve() == ROOT / "kernels" / "rope.py"
    assert is_hf == "True"  # Hugging Face's kernels package, what transformers imports


def test_no_top_level_folder_is_a_regular_package_other_than_spin_ray():
    regular = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert regular == ["spin_ray"]


def test_readme_python_example_runs_from_the_root(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = _run_from_root(example, tmp_path)
    # the example prints each output's finish reason: both of its prompts were completed
    assert len(re.findall(r" (?:length|stop) ", out)) >= 2, out


def test_a_built_wheel_installs_every_kernel_as_spin_ray_kernels(tmp_path):
    """The non-editable half: a wheel built from the checkout carries kernels/*.py under
    spin_ray/kernels/ (through the link) and nothing as a top-level `kernels`."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("spin_ray-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    kernels = {f"spin_ray/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}
    assert kernels and kernels <= names
    assert not any(name.startswith("kernels/") for name in names)
