"""numba only when a kernel runs, and locconf's kernel cache (locconf.jit): where it goes, what it says, read-only cases.

Every check runs in a fresh Python process, as the cache and the imports are per process.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

#: A module of one kernel, written into a temporary folder that the tests make read-only.
KERNEL_MODULE = '''
from locconf.jit import njit


@njit("test kernels")
def add(a, b):
    return a + b
'''

#: Calls the kernel and reports its result, the numba cache's hits and misses and its folder.
CHILD = r'''
import json, logging, sys, warnings
warnings.simplefilter("always")
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
sys.path.insert(0, sys.argv[1])
import onekernel
result = onekernel.add(2, 3)
stats = onekernel.add.stats
print(json.dumps({"result": result, "hits": sum(stats.cache_hits.values()), "misses": sum(stats.cache_misses.values()),
                  "cache_path": onekernel.add._cache.cache_path}))
'''


def run_child(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", **(env or {}))
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return res


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture
def read_only_package(tmp_path):
    """A folder holding ``onekernel.py``, made read-only (as a system-wide install); writable again afterwards."""
    package = tmp_path / "site"
    package.mkdir()
    (package / "onekernel.py").write_text(KERNEL_MODULE)
    package.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    yield package
    package.chmod(stat.S_IRWXU)


def test_importing_locconf_imports_no_numba():
    """numba costs about 0.2 s of import: only calling a kernel may import it."""
    code = ("import sys\n"
            "import locconf.postprocess, locconf.fusion, locconf.tiling, locconf.postprocess_files, "
            "locconf.experiment, locconf.evaluation, locconf.cli\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('numba', 'llvmlite')))\n"
            "import torch\n"
            "b = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])\n"
            "keep = locconf.postprocess.nms(b, torch.tensor([0.9, 0.8]))\n"
            "print(keep.tolist(), 'numba' in sys.modules)\n")
    lines = run_child(code).stdout.splitlines()
    assert lines[0] == "[]"
    assert lines[1] == "[0] True"  # the first CPU kernel call imports it


def test_kernels_are_cached_in_locconf_cache_not_in_a_read_only_package(read_only_package, tmp_path):
    cache = tmp_path / "cache"
    env = {"LOCCONF_CACHE": str(cache)}
    first = run_child(CHILD, str(read_only_package), env=env)
    out = json.loads(first.stdout)
    assert out["result"] == 5 and out["misses"] == 1 and out["hits"] == 0
    assert Path(out["cache_path"]).parent == cache / "numba"
    assert "locconf.jit: compiling the test kernels (numba), once per cache folder" in first.stderr
    assert str(cache / "numba") in first.stderr
    saved = files_under(cache / "numba")
    assert any(f.endswith(".nbi") for f in saved) and any(f.endswith(".nbc") for f in saved)
    assert files_under(read_only_package) == ["onekernel.py"]  # nothing beside the package's source

    second = run_child(CHILD, str(read_only_package), env=env)
    out = json.loads(second.stdout)
    assert out["result"] == 5 and out["hits"] == 1 and out["misses"] == 0  # loaded, not compiled
    assert "compiling" not in second.stderr
    assert files_under(cache / "numba") == saved


def test_without_a_writable_cache_kernels_compile_in_memory_with_one_warning(read_only_package, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # LOCCONF_CACHE under a file: no folder can be made there, even by root
    env = {"LOCCONF_CACHE": str(blocker / "cache")}
    for _ in range(2):  # nothing is kept: the second process compiles again
        res = run_child(CHILD, str(read_only_package), env=env)
        out = json.loads(res.stdout)
        assert out["result"] == 5 and out["misses"] == 1 and out["hits"] == 0
        assert "compiling the test kernels" in res.stderr
        assert res.stderr.count("RuntimeWarning: locconf cannot cache its compiled kernels in") == 1
        assert "Set LOCCONF_CACHE to a writable folder" in res.stderr
    assert files_under(read_only_package) == ["onekernel.py"]


def test_the_default_cache_is_under_home_and_the_real_kernels_use_it(tmp_path):
    """``~/.cache/locconf/numba`` by default; ``LOCCONF_CACHE`` moves it. Importing a kernel compiles nothing."""
    code = ("import json\n"
            "from locconf import jit\n"
            "from locconf.postprocess import kernel\n"
            "from locconf.fusion import assign\n"
            "print(json.dumps([str(jit.cache_dir()), kernel._nb_greedy._cache.cache_path, "
            "assign._nb_assign._cache.cache_path, len(kernel._nb_greedy.overloads)]))\n")
    env = {k: v for k, v in os.environ.items() if k != "LOCCONF_CACHE"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(env, HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr
    default, greedy, fusion, compiled = json.loads(res.stdout)
    assert Path(default) == tmp_path / "home" / ".cache" / "locconf" / "numba"
    assert Path(greedy).parent == Path(default) and Path(fusion).parent == Path(default)
    assert compiled == 0
    assert not (tmp_path / "home").exists()  # nothing is made before a kernel is saved

    moved = json.loads(run_child(code, env={"LOCCONF_CACHE": str(tmp_path / "elsewhere")}).stdout)
    assert Path(moved[0]) == tmp_path / "elsewhere" / "numba" and Path(moved[1]).parent == Path(moved[0])
