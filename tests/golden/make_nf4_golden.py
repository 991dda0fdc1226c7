"""Writes tests/golden/nf4_golden.safetensors: weights and the NF4 bytes bitsandbytes makes of
them, so tests pin the format where bitsandbytes is not installed. Run once, with bitsandbytes:

    python tests/golden/make_nf4_golden.py

The 8-bit codes of the double-quantized absmax come from bitsandbytes' reference backend (the
rule peftkern implements; see tests/test_nf4_bitsandbytes.py for its native CPU library).
"""

import json
from pathlib import Path

import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

# name: (shape, dtype, blocksize, double_quant)
CASES = {
    "fp32_67x45_bs64_dq": ((67, 45), torch.float32, 64, True),
    "bf16_1001_bs128": ((1001,), torch.bfloat16, 128, False),
    "fp16_33x129_bs4096_dq": ((33, 129), torch.float16, 4096, True),
    "fp32_200x130_bs32_dq": ((200, 130), torch.float32, 32, True),
    "bf16_96x64_bs256": ((96, 64), torch.bfloat16, 256, False),
}


def main():
    generator = torch.Generator().manual_seed(20261123)
    tensors, meta = {}, {}
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    for name, (shape, dtype, blocksize, double_quant) in CASES.items():
        w = (torch.randn(shape, generator=generator) * 0.1).to(dtype)
        packed, absmax = torch.ops.bitsandbytes.quantize_4bit(w, blocksize, "nf4", torch.uint8)
        tensors[f"{name}.weight"] = w
        tensors[f"{name}.packed"] = packed
        if double_quant:
            offset = absmax.mean()
            codes, nested = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
                keys, absmax - offset, F.create_dynamic_map(), 256
            )
            tensors[f"{name}.absmax"] = codes
            tensors[f"{name}.nested_absmax"] = nested
            tensors[f"{name}.offset"] = offset.reshape(1)
            state = F.QuantState(
                absmax=codes, shape=w.shape, code=F.get_4bit_type("nf4", device="cpu"), blocksize=blocksize, quant_type="nf4",
                dtype=dtype, offset=offset,
                state2=F.QuantState(absmax=nested, code=F.create_dynamic_map(), blocksize=256, dtype=torch.float32),
            )  # fmt: skip
        else:
            tensors[f"{name}.absmax"] = absmax
            state = F.QuantState(
                absmax=absmax, shape=w.shape, code=F.get_4bit_type("nf4", device="cpu"), blocksize=blocksize, quant_type="nf4",
                dtype=dtype,
            )  # fmt: skip
        tensors[f"{name}.dequantized"] = F.dequantize_4bit(packed, state).reshape(shape)
        meta[name] = {"blocksize": blocksize, "double_quant": double_quant}
    out = Path(__file__).with_name("nf4_golden.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata={"cases": json.dumps(meta)})
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
