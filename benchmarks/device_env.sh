# Source from the repository root on a GPU machine that has torch/triton/transformers but no network
# (so no `pip install -e .`): `import inflight` then resolves to this checkout.
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 -c 'import inflight.backend.engine, torch, triton; print("device_env:", torch.__version__, triton.__version__, torch.cuda.get_device_name())'
