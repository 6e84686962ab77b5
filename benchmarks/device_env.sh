# Source from the repository root on a GPU machine that has torch/triton/transformers but no network
# (so no `pip install -e .`): `import inflight` and `python3 -m benchmarks...` then resolve to this checkout.
# NOTE: the checkout goes AFTER site-packages (a .pth file there) and Python skips the current directory
# (PYTHONSAFEPATH): first on sys.path, its kernels/ folder would shadow Hugging Face's `kernels` package,
# which transformers >= 5.25 imports. Where site-packages is not writable, PYTHONPATH (first) it is.
_site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if echo "$(pwd)" 2>/dev/null > "$_site/inflight_checkout.pth"; then
  export PYTHONSAFEPATH=1
else
  echo "device_env: $_site is not writable: the checkout goes on PYTHONPATH" >&2
  export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
python3 -c 'import inflight.backend.engine.engine, torch, triton; print("device_env:", torch.__version__, triton.__version__, torch.cuda.get_device_name())'
