"""Packaging: the package installs without warnings from its own packaging, its environments' dependencies are
consistent (CI runs pip check in both), and the Kubernetes client is an extra the submit tool names when it is
missing."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys

from conftest import REPO_ROOT, repo_env

# Setuptools' warnings (e.g. "_Warning: Package 'k8s.base' is absent from the `packages` configuration");
# not its "InformationOnly" notice that every editable install prints, nor pip's "WARNING: ..." lines, which
# are about the environment (e.g. an index location).
SETUPTOOLS_WARNING = re.compile(r"\w*Warning\b|would be ignored")


def test_editable_install_prints_no_packaging_warnings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, src / name)
    for package in ("trainer", "data_pipeline", "k8s"):
        shutil.copytree(REPO_ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-v", "--no-deps", "-e", str(src)],
                          capture_output=True, text=True, timeout=600,
                          env={**repo_env(), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if SETUPTOOLS_WARNING.search(line)
                and not line.lstrip().startswith("WARNING: ")]
    assert warnings == [], "\n".join(warnings[:20])


def test_this_environment_has_consistent_dependencies():
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ci_runs_pip_check_in_both_environments_before_the_tests():
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    tests = ci.index(".venv/bin/python -m pytest -v")
    for env in (".venv", ".venv-horovod"):
        assert f"{env}/bin/python -m pip check" in ci[:tests], env
    installer = (REPO_ROOT / "scripts" / "install_horovod.sh").read_text()
    assert re.search(r'^"\$\{pip\[@\]\}" check ', installer, re.M)


def test_kubernetes_client_is_the_k8s_extra():
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    core, extras = setup["options"]["install_requires"], setup["options.extras_require"]
    for requirement in ("kubernetes", "jsonschema"):
        assert requirement not in core
        assert requirement in extras["k8s"] and requirement in extras["dev"]


SUBMIT_WITHOUT_KUBERNETES = """
import sys
sys.modules["kubernetes"] = None  # as if the k8s extra were not installed: importing it raises ImportError
from k8s import submit
sys.exit(submit.main(["status", "exp1", "--namespace", "ml"]))
"""


def test_submit_without_the_kubernetes_client_names_the_extra():
    proc = subprocess.run([sys.executable, "-c", SUBMIT_WITHOUT_KUBERNETES], cwd=REPO_ROOT, env=repo_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "pip install 'multilabel-trainer[k8s]'" in proc.stderr, proc.stderr
