"""What machine and build a benchmark ran on: printed by ``fastdl info``, stored with every result."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import fastdl


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def total_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cuda_devices() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        devices.append({
            "index": index,
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "memory_bytes": properties.total_memory,
            "multiprocessors": properties.multi_processor_count,
        })
    return devices


def git_revision() -> dict | None:
    """Commit of the source checkout fastdl runs from, so a result can be traced to the code timed."""
    root = Path(fastdl.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def default_device() -> torch.device:
    """cuda when a GPU is visible and fastdl was compiled with CUDA kernels (else fastdl could not run
    there and every case would fail), cpu otherwise."""
    if torch.cuda.is_available() and fastdl.build_info()["cuda"]:
        return torch.device("cuda")
    return torch.device("cpu")


def machine_info() -> dict:
    """Build, software and hardware facts, JSON-serializable."""
    return {
        "fastdl_version": fastdl.__version__,
        "build": fastdl.build_info(),
        "git": git_revision(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "torch_num_threads": torch.get_num_threads(),
        "python_version": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "memory_bytes": total_memory_bytes(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": cuda_devices(),
    }


def short_machine_description(info: dict) -> str:
    """One line for table and plot titles, e.g. 'AMD EPYC, 2 threads, torch 2.13.0+cpu'."""
    parts = [info["cpu_model"], f"{info['torch_num_threads']} torch threads"]
    parts += [f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')})" for gpu in info["cuda_devices"]]
    parts.append(f"torch {info['torch_version']}")
    return ", ".join(parts)
