#!/usr/bin/env bash
# The GPU checks of issue 7 in one command, on a CUDA machine that reaches no package index.
#
#   .venv/bin/python benchmarks/gpu_kit.py                  # here, first: the kit (.gpu-kit/, ~28 MB)
#   bash benchmarks/gpu_check.sh .gpu-kit OUT_DIR [STEP...] # there, in the repository root
#
# .gpu-kit is git-ignored: send it along with the working tree (a device run names it among its carried
# paths). Not yet run on a GPU as one script; from the H100 runs' step times, allow it ~8 minutes.
#
# STEPs, in this order (default: all of them):
#   tests   pytest -m gpu over tests/: bf16 learner, in-place weight gradients, chunk memory bounds,
#           training steps, the hf engine's per-prompt CUDA generators, vLLM sleep/wake/push on CUDA
#   layout  one Learner.update of the GPU workload (benchmarks/learner_layout.py): time and peak memory,
#           padded rows, statistics in 16 and 64 MiB blocks
#   bench   benchmarks/bench.py --gpu --rollout hf: grpo vs TRL, 5 measured steps
# The model for layout and bench is benchmarks/random_model.py's (Qwen2.5-0.5B's shape, random weights),
# built once in /tmp/qwen05-random. Each step's output goes to OUT_DIR/<step>.log; the benchmark's
# RESULTS.md entry to OUT_DIR/bench.md. A step that fails is reported and the next one still runs;
# the exit status is the number of steps that failed.
set -u
kit=$(realpath "${1:?usage: gpu_check.sh KIT OUT_DIR [tests|layout|bench]...}")
out=$(realpath -m "${2:?usage: gpu_check.sh KIT OUT_DIR [tests|layout|bench]...}")
shift 2
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests layout bench)
python=${PYTHON:-python3}
site=/tmp/gpu-kit-site
model=/tmp/qwen05-random
mkdir -p "$out"

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

if [ ! -d "$site" ]; then
    say "installing $(ls "$kit"/wheels | wc -l) wheels into $site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$kit"/wheels/*.whl \
        || { say "pip install failed"; exit 99; }
    for sdist in "$kit"/sdists/*.tar.gz; do
        [ -e "$sdist" ] || continue
        # pycosat: a C extension with no wheel for this Python. reasoning-gym imports it at start-up but
        # only its logic puzzles call it (never chain_sum, the task every check uses); if it cannot be
        # built here, a module that raises on use stands in, and the log says so.
        if ! "$python" -m pip install -q --no-index --no-deps --no-build-isolation --target "$site" "$sdist"; then
            name=$(basename "$sdist" | sed 's/-[^-]*$//')
            say "could not build $name; a stand-in that raises on use is installed instead"
            printf 'def _unbuilt(*args, **kwargs):\n    raise RuntimeError("%s was not built on this machine")\n\nsolve = itersolve = _unbuilt\n' \
                "$name" >"$site/$name.py"
        fi
    done
fi
export PYTHONPATH="$site:$PWD" GRPO_CACHE="$kit/cache" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/[gpu_check] /'
"$python" -c "import torch, transformers, trl, reasoning_gym, grpo_cli.cli; print('[gpu_check] torch', torch.__version__,
'cuda', torch.cuda.is_available(), '| transformers', transformers.__version__, '| trl', trl.__version__)" \
    || { say "the environment does not import"; exit 98; }

failed=0
model() {  # the random 0.5B-shape model, built once
    [ -f "$model/config.json" ] || "$python" benchmarks/random_model.py "$model" || { failed=$((failed + 1)); return 1; }
}
run_step() {  # run_step NAME SECONDS COMMAND...: the command's output to OUT_DIR/NAME.log and here
    local name=$1 limit=$2
    shift 2
    say "$name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    say "$name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

for step in "${steps[@]}"; do
    case $step in
        tests) run_step tests 300 "$python" -m pytest -q -m gpu -p no:cacheprovider tests/ ;;
        layout) model && run_step layout 180 "$python" benchmarks/learner_layout.py --gpu --model "$model" \
            --rows --memory --updates 3 --stats-block-mib 64 ;;
        bench) model && run_step bench 420 "$python" benchmarks/bench.py --gpu --rollout hf --model "$model" --steps 5 \
            --out /tmp/gpu-bench --results "$out/bench.md" ;;
        *) say "unknown step $step (tests, layout, bench)"; failed=$((failed + 1)) ;;
    esac
done
say "done: $failed step(s) failed"
exit "$failed"
