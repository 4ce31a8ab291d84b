"""The compiled extension: what fastdl.build_info() reports, the stale-build check at import, and the
`fastdl info` command line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import fastdl
import fastdl._extension
from fastdl import ExtensionError
from fastdl.cli import main as cli_main

REBUILD_COMMAND = "pip install --no-build-isolation -e ."


def test_build_info_keys_and_types() -> None:
    info = fastdl.build_info()
    assert {"version", "cpu_isa", "cuda", "cuda_archs", "cxx_compiler"} <= info.keys()
    assert info["version"] == fastdl.__version__
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cpu_isa"], str) and info["cpu_isa"]
    assert isinstance(info["cxx_compiler"], str) and info["cxx_compiler"]
    assert isinstance(info["cuda_archs"], str)
    if info["cuda"]:
        # TORCH_CUDA_ARCH_LIST format, e.g. "8.0;9.0".
        assert re.fullmatch(r"\d+\.\d+(\+PTX)?(;\d+\.\d+(\+PTX)?)*", info["cuda_archs"]), info["cuda_archs"]
    else:
        assert info["cuda_archs"] == ""
    # The import-time checks compared these, so a mismatch would not have imported at all; the
    # values must still be what they say.
    assert info["torch_version"] == torch.__version__


def test_cuda_kernels_registered_iff_built_with_cuda() -> None:
    # torch.ops.fastdl.* exist for CPU always; a CUDA kernel is registered exactly when the build says so.
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("fastdl::fused_adam_", "CUDA")
    assert has_cuda_kernel == fastdl.build_info()["cuda"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastdl::fused_adam_", "CPU")


@pytest.fixture
def stale_check_on(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("FASTDL_SKIP_STALE_CHECK", raising=False)
    return monkeypatch


def test_load_accepts_current_build(stale_check_on: pytest.MonkeyPatch) -> None:
    stale_check_on.setattr(fastdl._extension, "_source_hash", lambda: fastdl.build_info()["source_hash"])
    assert fastdl._extension.load() is fastdl._C


def test_stale_build_raises_with_rebuild_command(stale_check_on: pytest.MonkeyPatch) -> None:
    built = fastdl.build_info()["source_hash"]
    edited = "0123456789abcdef" if built != "0123456789abcdef" else "fedcba9876543210"
    stale_check_on.setattr(fastdl._extension, "_source_hash", lambda: edited)
    with pytest.raises(ExtensionError) as excinfo:
        fastdl._extension.load()
    message = str(excinfo.value)
    assert "stale" in message
    assert built in message and edited in message
    assert REBUILD_COMMAND in message
    assert "FASTDL_SKIP_STALE_CHECK=1" in message
    # An ImportError, so that `import fastdl` fails the way a missing extension does.
    assert isinstance(excinfo.value, ImportError)


def test_stale_check_can_be_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastdl._extension, "_source_hash", lambda: "0" * 16)
    monkeypatch.setenv("FASTDL_SKIP_STALE_CHECK", "1")
    assert fastdl._extension.load() is fastdl._C


def test_no_source_checkout_skips_stale_check(stale_check_on: pytest.MonkeyPatch) -> None:
    # An installed wheel has no csrc/ to hash.
    stale_check_on.setattr(fastdl._extension, "_source_hash", lambda: None)
    assert fastdl._extension.load() is fastdl._C


def test_version_mismatch_raises(stale_check_on: pytest.MonkeyPatch) -> None:
    import fastdl._version

    stale_check_on.setattr(fastdl._version, "__version__", "99.0.0")
    with pytest.raises(ExtensionError, match=r"built for fastdl .* but the Python package is 99\.0\.0") as excinfo:
        fastdl._extension.load()
    assert REBUILD_COMMAND in str(excinfo.value)


def test_source_hash_tracks_csrc(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The hash covers every file under csrc/, by relative path and content.
    (tmp_path / "csrc" / "optim").mkdir(parents=True)
    (tmp_path / "csrc" / "optim" / "a.cpp").write_text("int a;\n")
    monkeypatch.setattr(fastdl._extension, "_ROOT", str(tmp_path))
    first = fastdl._extension._source_hash()
    (tmp_path / "csrc" / "optim" / "a.cpp").write_text("int a = 1;\n")
    edited = fastdl._extension._source_hash()
    (tmp_path / "csrc" / "optim" / "a.cpp").rename(tmp_path / "csrc" / "optim" / "b.cpp")
    renamed = fastdl._extension._source_hash()
    assert len({first, edited, renamed}) == 3
    assert re.fullmatch(r"[0-9a-f]{16}", first)


def _check_info_output(out: str) -> None:
    cuda_line = next((line for line in out.splitlines() if "CUDA kernels" in line), None)
    assert cuda_line is not None, out
    if fastdl.build_info()["cuda"]:
        assert "not compiled" not in cuda_line and fastdl.build_info()["cuda_archs"].split(";")[0] in cuda_line
    else:
        assert "not compiled" in cuda_line
    assert fastdl.__version__ in out
    assert torch.__version__ in out


def test_cli_info_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info"]) == 0
    _check_info_output(capsys.readouterr().out)


def test_python_m_fastdl_info() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fastdl", "info"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_child_env(),
    )
    assert result.returncode == 0, result.stderr
    _check_info_output(result.stdout)


def test_fastdl_console_script_info() -> None:
    # The `fastdl` entry point of pyproject.toml, installed beside this interpreter.
    script = shutil.which("fastdl", path=sysconfig.get_path("scripts")) or shutil.which("fastdl")
    assert script is not None, "the fastdl console script is not installed (pip install --no-build-isolation -e .)"
    result = subprocess.run([script, "info"], capture_output=True, text=True, timeout=120, env=_child_env())
    assert result.returncode == 0, result.stderr
    _check_info_output(result.stdout)


def _child_env() -> dict[str, str]:
    # One thread: the child only prints; it need not compete for the 2 cores with the test run.
    return {**os.environ, "OMP_NUM_THREADS": "1"}
