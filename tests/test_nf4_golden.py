"""Pins the NF4 format with bytes bitsandbytes produced (tests/golden/make_nf4_golden.py), so the
format stays checked where bitsandbytes is not installed."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import peftkern

GOLDEN = Path(__file__).parent / "golden" / "nf4_golden.safetensors"


def golden_cases():
    with safe_open(str(GOLDEN), "pt") as f:
        return json.loads(f.metadata()["cases"])


@pytest.mark.parametrize("name, spec", sorted(golden_cases().items()))
def test_golden_vectors(name, spec):
    t = load_file(str(GOLDEN))
    weight = t[f"{name}.weight"]
    q = peftkern.nf4_quantize(weight, blocksize=spec["blocksize"], double_quant=spec["double_quant"])
    assert torch.equal(q.packed, t[f"{name}.packed"])
    assert torch.equal(q.absmax, t[f"{name}.absmax"])
    if spec["double_quant"]:
        assert torch.equal(q.nested.absmax, t[f"{name}.nested_absmax"])
        assert torch.equal(q.nested.offset.reshape(1), t[f"{name}.offset"])
    assert torch.equal(q.dequantize(), t[f"{name}.dequantized"])
