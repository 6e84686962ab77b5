# Source from the repository root on a GPU machine that has torch/triton/transformers but no network
# (and so cannot `pip install -e .`): makes `import inflight` resolve to this checkout.
_inflight_root=$(pwd)
mkdir -p /tmp/inflight-pkg/inflight
cp "$_inflight_root/inflight/__init__.py" /tmp/inflight-pkg/inflight/
for _d in backend batching kernels client; do ln -sfn "$_inflight_root/$_d" "/tmp/inflight-pkg/inflight/$_d"; done
export PYTHONPATH="/tmp/inflight-pkg:$_inflight_root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 -c 'import inflight.backend.engine, torch, triton; print("device_env:", torch.__version__, triton.__version__, torch.cuda.get_device_name())'
