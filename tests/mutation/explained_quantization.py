"""Explained survivors of `make mutate` in the quantization config (see explained.py)."""

from tests.mutation.report import Explained

QUANTIZATION: list[Explained] = [
    Explained(
        "backend/executor/quantization/config.py",
        "_quantization_config",
        'qc = {"quant_method": "modelopt", **json.loads(modelopt.read_text()).get("quantization", {})}',
        'qc = {"quant_method": "MODELOPT", **json.loads(modelopt.read_text()).get("quantization", {})}',
        "resolve_quantization lowercases quant_method before looking it up, so 'MODELOPT' picks the same parser.",
    ),
]
