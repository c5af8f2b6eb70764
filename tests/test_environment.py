"""The environment scripts/setup_env.sh builds: the pins that keep torch, TotalSegmentator and friends
installable together (docs/development.md#dependency-facts)."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import shutil
import subprocess

import pytest
from packaging.version import Version


def _has_nvidia_gpu() -> bool:
    exe = shutil.which("nvidia-smi")
    return bool(exe) and subprocess.run([exe, "-L"], capture_output=True).returncode == 0


def test_cpu_machines_get_the_pinned_cpu_torch() -> None:
    if _has_nvidia_gpu():
        pytest.skip("an NVIDIA GPU is present: the CPU pin does not apply")
    import torch

    assert torch.__version__.split("+")[0] == "2.13.0", f"expected the CPU torch 2.13.0, got {torch.__version__}"
    assert not torch.version.cuda, f"a CUDA build of torch was installed on a CPU machine: {torch.version.cuda}"


def test_no_broken_torchvision() -> None:
    """TotalSegmentator's dependency chain must not leave a torchvision that cannot load beside torch."""
    if importlib.util.find_spec("torchvision") is None:
        return  # the guard kept it out: nothing to break
    import torchvision  # noqa: F401  (raises 'operator torchvision::nms does not exist' when mismatched)


def test_dynamic_network_architectures_pinned_below_0_4() -> None:
    try:
        version = Version(md.version("dynamic-network-architectures"))
    except md.PackageNotFoundError:
        pytest.skip("TotalSegmentator extra not installed")
    assert version < Version("0.4"), (f"dynamic-network-architectures {version} pulls torchvision "
                                      "(docs/development.md#dependency-facts)")


def test_totalsegmentator_class_map_importable() -> None:
    pytest.importorskip("totalsegmentator", reason="TotalSegmentator extra not installed")
    from totalsegmentator.map_to_binary import class_map

    assert len(class_map["total"]) == 117
