"""What users install: the wheel, built and installed (not editable) into clean virtualenvs.

An editable install maps the import names onto the source folders, so it hides a wheel that
ships without some of its subpackages. These tests build the wheel as users would, check that
it holds every module of both packages, and run the CLI from fresh installs of it: the bare
install (the operator's, no torch) and one with the training dependencies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"difftrain": ROOT / "trainer", "difftrain_operator": ROOT / "operator"}


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # never from the work tree: `python -c` puts the current folder first on sys.path, where
    # operator/ would shadow the standard library's operator module
    return subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
        cwd=Path(env["HOME"]) if env and "HOME" in env else Path("/"),
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # the source is copied so the build leaves nothing (build/, *.egg-info) in the work tree
    src = build / "src"
    files = _run("git", "-C", ROOT, "ls-files", "--cached", "--others", "--exclude-standard")
    for name in files.stdout.splitlines():
        path = ROOT / name
        if path.is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(path.read_bytes())
    done = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, src
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("difftrain-*.whl")
    return path


def _expected_files() -> set[str]:
    names = set()
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*"):
            wanted = path.suffix == ".py" or path.name == "py.typed"
            if path.is_file() and wanted and "__pycache__" not in path.parts:
                names.add(f"{package}/{path.relative_to(folder).as_posix()}")
    return names


def test_wheel_holds_every_module_of_both_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        shipped = {n for n in archive.namelist() if not n.split("/")[0].endswith(".dist-info")}
    missing = _expected_files() - shipped
    assert not missing, f"the wheel lacks {sorted(missing)[:10]}"
    for sub in ("api", "data", "merge", "models", "train"):
        assert f"difftrain/{sub}/__init__.py" in shipped


def _fresh_venv(where: Path) -> tuple[Path, dict[str, str]]:
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{where / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(where)  # nothing read from the user's site-packages or caches
    env["PYTHONNOUSERSITE"] = "1"
    return where / "bin", env


def _pip_cache_env(env: dict[str, str]) -> dict[str, str]:
    # the package downloads of `make install` are reused; HOME moved, so name the cache
    cache = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip"))
    return {**env, "PIP_CACHE_DIR": str(cache), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _where_imported(bin_dir: Path, env: dict[str, str], module: str) -> str:
    done = _run(bin_dir / "python", "-c", f"import {module}; print({module}.__file__)", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_bare_install_runs_the_operator_command_without_torch(wheel: Path, tmp_path: Path) -> None:
    bin_dir, env = _fresh_venv(tmp_path / "venv")
    done = _run(bin_dir / "pip", "install", "--quiet", wheel, env=_pip_cache_env(env))
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(tmp_path / "venv") in _where_imported(bin_dir, env, "difftrain_operator.handlers")
    no_torch = _run(bin_dir / "python", "-c", "import torch", env=env)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    help_text = _run(bin_dir / "difftrain", "operator", "--help", env=env)
    assert help_text.returncode == 0, help_text.stderr
    assert "--standalone" in help_text.stdout
    examples = sorted(ROOT.glob("examples/*.yaml"))
    validated = _run(bin_dir / "difftrain", "validate", *examples, env=env)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    checked = _run(bin_dir / "difftrain", "crds", "--check", "--out", ROOT / "crds", env=env)
    assert checked.returncode == 0, checked.stderr


def test_install_with_the_training_dependencies_imports_and_runs_every_command(
    wheel: Path, tmp_path: Path
) -> None:
    """The wheel alone in a clean venv, the training libraries from this environment.

    The `train` extra's libraries (PyTorch with its CUDA libraries is about 6 GB) are the ones
    this test run already has: a `.pth` file appends their folder after the venv's own, where
    only the wheel's packages are. The trainer image installs the extra for real.
    """
    bin_dir, env = _fresh_venv(tmp_path / "venv")
    done = _run(bin_dir / "pip", "install", "--quiet", "--no-deps", wheel, env=_pip_cache_env(env))
    assert done.returncode == 0, done.stderr[-3000:]
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_run(bin_dir / "python", "-c", where, env=env).stdout.strip())
    (site / "zz-training-libraries.pth").write_text(sysconfig.get_path("purelib") + "\n")

    script = (
        "import importlib, pkgutil, difftrain, difftrain_operator\n"
        "for pkg in (difftrain, difftrain_operator):\n"
        "    for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        if not mod.name.endswith('__main__'):\n"
        "            importlib.import_module(mod.name)\n"
        "print(difftrain.__file__)\n"
    )
    imported = _run(bin_dir / "python", "-c", script, env=env)
    assert imported.returncode == 0, imported.stderr[-3000:]
    assert str(tmp_path / "venv") in imported.stdout

    for command in (["run", "--help"], ["merge", "--help"], ["dataset", "cache", "--help"]):
        shown = _run(bin_dir / "difftrain", *command, env=env)
        assert shown.returncode == 0, (command, shown.stderr[-2000:])
    # a real merge of two tiny checkpoints through the installed command
    make = (
        "import torch, safetensors.torch as st, sys\n"
        "for i, name in enumerate(sys.argv[1:]):\n"
        "    st.save_file({'w': torch.full((4, 4), float(i))}, name)\n"
    )
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    assert _run(bin_dir / "python", "-c", make, a, b, env=env).returncode == 0
    merged = _run(bin_dir / "difftrain", "merge", a, b, "--alpha", "0.25", "-o", out, env=env)
    assert merged.returncode == 0, merged.stderr[-2000:]
    check = "import safetensors.torch as s, sys; print(float(s.load_file(sys.argv[1])['w'][0, 0]))"
    assert _run(bin_dir / "python", "-c", check, out, env=env).stdout.strip() == "0.25"
