# Source on the GPU machine (no network) from the repository root, with `.gpu` carried along (`make
# bench-carry` builds it here: tokenizer files + ../shared/gpu's bundle of the Triton 2.51 server, numpy 1.26
# and tritonclient):
#   source benchmarks/gpu_serving_setup.sh
# Then `python3` is /tmp/inflight-venv's (numpy 1.26 + tritonclient first, the image's torch after) and
#   python3 -m benchmarks.serving ... / python3 -m benchmarks.bench ...
# start the real tritonserver through inflight.tools.server like on a CPU machine.
#  1. ../shared/gpu/remote-env.sh (carried as .gpu/remote-env.sh): the venv, the server unpacked in
#     /tmp/inflight-tritonserver, PATH with the venv first (the Python stub takes its packages from it);
#  2. links that server into the venv's site-packages, where inflight.tools.triton_install.find_triton() looks
#     for the nvidia-pytriton wheel's layout (pytriton/tritonserver, nvidia_pytriton.libs);
#  3. makes `import inflight` resolve to this checkout in the venv from any directory (a .pth file);
#  4. checks each piece and says which one is missing.
_bench_fail() { echo "gpu_serving_setup: $*" >&2; return 1; }
_bench_setup() {
  [ -f .gpu/remote-env.sh ] && [ -f .gpu/tritonserver-slim.tar.xz ] \
    || { _bench_fail "no .gpu bundle here: run \`make bench-carry\` on the CPU machine and carry .gpu"; return 1; }
  # shellcheck disable=SC1091
  source .gpu/remote-env.sh || { _bench_fail "sourcing .gpu/remote-env.sh failed"; return 1; }
  local site
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') || return 1
  case "$site" in /tmp/inflight-venv/*) ;; *) _bench_fail "python3 is not the bundle's venv ($site)"; return 1 ;; esac
  ln -sfn /tmp/inflight-tritonserver/pytriton "$site/pytriton"
  ln -sfn /tmp/inflight-tritonserver/nvidia_pytriton.libs "$site/nvidia_pytriton.libs"
  # The image's scikit-learn and SciPy are built for numpy 2; transformers imports sklearn when it finds it
  # (generation/candidate_generator), which breaks under this venv's numpy 1.26: hide both from every
  # interpreter of the venv (the Triton stub included). A None entry makes find_spec say "not installed".
  echo "import sys; [sys.modules.setdefault(m, None) for m in ('sklearn', 'scipy')]" > "$site/inflight_hide_numpy2_builds.pth"
  # The checkout on every interpreter's sys.path (the Triton stub's included, which runs from any directory).
  echo "$(pwd)" > "$site/inflight_checkout.pth"
  export PYTHONUNBUFFERED=1
  env -u PYTHONPATH python3 - <<'PY' || { _bench_fail "a piece is missing (above)"; return 1; }
import os, sys
os.chdir("/")  # import as the stub will: from site-packages, not from the current directory
import numpy, torch, tritonclient.grpc  # noqa: F401
import inflight.backend.engine.engine  # noqa: F401
from transformers import AutoTokenizer  # noqa: F401  (the engine's first import of transformers)
import transformers.generation.utils  # noqa: F401
from inflight.tools.triton_install import backend_directory, find_triton
install = find_triton()
backend_directory(install)
assert numpy.__version__.startswith("1."), f"numpy {numpy.__version__}: the Triton 2.51 stub needs numpy 1.x"
print(f"gpu_serving_setup: OK: tritonserver {install.binary}, numpy {numpy.__version__}, torch {torch.__version__}, "
      f"cuda {torch.cuda.is_available()} ({torch.cuda.get_device_name() if torch.cuda.is_available() else '-'})")
PY
}
_bench_setup
