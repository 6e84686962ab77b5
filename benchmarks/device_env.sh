# Source from the repository root on a GPU machine that has torch/triton/transformers but no network
# (so no `pip install -e .`): `import inflight` and `python3 -m benchmarks...` then resolve to this checkout.
# The checkout goes on sys.path through a .pth file in site-packages (every interpreter, from any directory);
# where site-packages is not writable, on PYTHONPATH.
_site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! echo "$(pwd)" 2>/dev/null > "$_site/inflight_checkout.pth"; then
  echo "device_env: $_site is not writable: the checkout goes on PYTHONPATH" >&2
  export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# The engine's structured-output library (a base dependency) from the wheel `make gpu-carry` puts in .gpu/tok.
python3 -c 'import llguidance' 2>/dev/null || python3 -m pip install -q --no-deps --no-index .gpu/tok/llguidance-*.whl
python3 -c 'import inflight.backend.engine.engine, torch, triton; print("device_env:", torch.__version__, triton.__version__, torch.cuda.get_device_name())'
