"""The virtual environment TRL is measured in: benchmarks/.venv-trl (benchmarks/.venv-trl-gpu with --gpu).

TRL gets its own environment so that its pins never touch grpo's. Every package the two tools share
(transformers, accelerate, the math-verify stack) is pinned to the version installed beside grpo,
so the comparison measures the trainers, not two versions of transformers.

CPU: torch==2.13.0+cpu goes in first and stays pinned in the second install, so the resolver can
never pull a CUDA build (a multi-GB download) to satisfy TRL. GPU: the environment sees every package
of the one running this script (a .pth file naming its site-packages), its CUDA torch included, and
installs no torch at all; what TRL's pins add goes into its own site-packages, which come first.
Where this interpreter already has trl at the pin (a GPU machine set up by benchmarks/gpu_check.sh,
which may have no `venv`/`ensurepip`), it is used itself: the pins would all be its own anyway.

    python benchmarks/trl_venv.py [--gpu]    # create or check it; prints where it is
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL_VERSION = "1.16.0"
TORCH_CPU = "torch==2.13.0+cpu"
# Installed beside grpo and needed by TRL's side too: pinned to grpo's versions.
SHARED = ("transformers", "accelerate", "datasets", "safetensors", "tokenizers", "math-verify",
          "latex2sympy2_extended", "antlr4-python3-runtime", "sympy")


def venv_dir(gpu: bool) -> Path:
    return HERE / (".venv-trl-gpu" if gpu else ".venv-trl")


def installed(name: str) -> str | None:
    """The version of `name` installed beside grpo, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def requirements(gpu: bool) -> list[str]:
    pins = [f"trl=={TRL_VERSION}"]
    for name in SHARED:
        version = installed(name)
        pins.append(f"{name}=={version}" if version else name)
    return pins if gpu else [TORCH_CPU, *pins]


def _local_torch_wheel() -> bool:
    """Whether pip's find-links folders hold the CPU torch wheel (else PyTorch's CPU index is needed)."""
    for folder in filter(None, os.environ.get("PIP_FIND_LINKS", "").replace(":", " ").split()):
        if glob.glob(os.path.join(folder, "torch-2.13.0+cpu-*.whl")):
            return True
    return False


def _run(cmd: list[str]) -> None:
    """Run a setup command quietly (pip's index warnings are noise here); its output only on failure."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stdout.write(done.stdout + done.stderr)
        raise SystemExit(f"bench: setting up TRL's environment failed: {' '.join(cmd)} (exit {done.returncode})")


def _inherit_packages(python: Path) -> None:
    """Make `python`'s environment see this interpreter's packages, after its own."""
    import sysconfig

    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_grpo_parent_env.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))


def ensure(gpu: bool = False, log: bool = True) -> tuple[Path, float]:
    """The environment's python, creating or completing the environment first; and the seconds
    that took (0 when it was already there with the same pins)."""
    if gpu and installed("trl") == TRL_VERSION:
        if log:
            print(f"[bench] trl=={TRL_VERSION} is installed beside grpo: TRL runs on {sys.executable}", flush=True)
        return Path(sys.executable), 0.0
    venv = venv_dir(gpu)
    python = venv / "bin" / "python"
    stamp = venv / ".bench-requirements"
    wanted = "\n".join(requirements(gpu)) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python, 0.0
    start = time.perf_counter()
    if log:
        print(f"[bench] setting up {venv} (trl=={TRL_VERSION}; a few minutes of pip, once)", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        if gpu:  # grpo's own environment (often a venv itself) holds the machine's CUDA torch
            _inherit_packages(python)
    pip = [str(python), "-m", "pip", "install", "-q"]
    if not gpu:
        index = [] if _local_torch_wheel() else ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
        _run([*pip, *index, TORCH_CPU])
        _run([*pip, *index, *requirements(gpu)])
        _run([str(python), "-c", "import torch, trl; assert not torch.version.cuda, torch.__version__"])
    else:
        _run([*pip, *requirements(gpu)])
        _run([str(python), "-c", "import torch, trl; assert torch.cuda.is_available()"])
    stamp.write_text(wanted)
    seconds = time.perf_counter() - start
    if log:
        print(f"[bench] {venv} ready in {seconds:.0f} s", flush=True)
    return python, seconds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the GPU flavour (machine's CUDA torch)")
    args = parser.parse_args()
    python, _ = ensure(args.gpu)
    print(python)
