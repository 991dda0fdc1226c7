"""Inputs no op may accept silently, across every op family: tensors on two devices (a meta
tensor among CPU ones is dispatched to the fake implementation, which must refuse rather than
return uninitialised memory), and row_adapter values that do not fit the op's int32."""

import pytest
import torch

from peftkern import _ext
from peftkern.ops import grouped as grouped_ops

pytestmark = pytest.mark.skipif(not _ext.available(), reason="op library not built")


def cases():
    """(op, args) with valid CPU inputs; each test moves one tensor to meta."""
    x, w, a, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    packed, absmax = torch.ops.peftkern.nf4_quantize(torch.randn(64), 64)
    return [
        ("lora_linear_fwd", (x, w, None, a, b, 0.5, 0.1, 3, 4)),
        ("lora_linear_bwd", (torch.randn(3, 5), x, w, a, b, torch.randn(3, 2), 0.5, 0.1, 3, 4)),
        ("lora_dropout_accumulate_", (torch.randn(3, 8), x, 0.1, 3, 4)),
        ("lora_dropout_backward_", (torch.randn(3, 8), torch.randn(3, 8), x, 0.1, 3, 4)),
        ("dora_weight_norm", (w, a, b, 0.5)),
        ("ia3_input_linear_fwd", (x, w, None, torch.ones(1, 8))),
        ("ia3_output_linear_fwd", (x, w, None, torch.ones(5, 1))),
        ("adapter_bottleneck_fwd", (x, x, torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8),
                                    1.0, None, 0)),  # fmt: skip
        ("nf4_dequantize", (packed, absmax, 64, [64], torch.float32)),
        ("dequantize_blockwise_8bit", (torch.zeros(4, dtype=torch.uint8), torch.ones(1), torch.randn(256), 256)),
        ("nf4_lora_gemv", (torch.randn(1, 64), packed, absmax, None, None, None, 64, 0, 1, None, None, None, 0.0)),
        ("nf4_lora_linear_fwd", (torch.randn(3, 64), packed, absmax, None, None, None, 64, 0, 1, torch.randn(1),
                                 torch.randn(3, 2), torch.randn(1, 2), 0.5, 0)),  # fmt: skip
        ("nf4_lora_linear_bwd_input", (torch.randn(3, 1), packed, absmax, None, None, None, 64, 0, 64,
                                       torch.randn(3, 2), torch.randn(2, 64), 0)),  # fmt: skip
        ("nf4_lora_linear_train", (torch.randn(3, 64), packed, absmax, None, None, None, 64, 0, 1, torch.randn(1),
                                   torch.randn(2, 64), torch.randn(1, 2), 0.5, 0.1, 3, 4)),  # fmt: skip
        ("lora_grouped_fwd", (torch.randn(3, 5), x, [a], [b], [0.5], torch.zeros(3, dtype=torch.int32))),
        ("ia3_grouped_scale", (torch.randn(3, 5), torch.ones(1, 5), torch.zeros(3, dtype=torch.int32))),
        ("quantize_blockwise_8bit", (torch.randn(10), torch.randn(256), 256)),
        ("proxy_logits", (torch.randn(2, 9), torch.randn(2, 11), torch.randn(2, 9), 1.0, 0.8, 3, 0.9, 1)),
        ("cross_entropy_fwd", (torch.randn(3, 9), torch.tensor([0, 8, -100]), -100)),
        ("cross_entropy_bwd", (torch.ones(3), torch.randn(3, 9), torch.tensor([0, 8, -100]), torch.ones(3), -100)),
    ]


def _to_meta(args, index):
    args = list(args)
    args[index] = args[index].to("meta") if isinstance(args[index], torch.Tensor) else [t.to("meta") for t in args[index]]
    return args


@pytest.mark.parametrize("op, args", cases(), ids=[c[0] for c in cases()])
def test_a_meta_tensor_among_cpu_tensors_is_refused_not_faked(op, args):
    getattr(torch.ops.peftkern, op)(*args)  # the CPU inputs are valid
    tensor_positions = [i for i, v in enumerate(args) if isinstance(v, torch.Tensor)
                        or (isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v))]  # fmt: skip
    for index in tensor_positions[1:]:  # the first tensor on CPU, another one on meta
        with pytest.raises((ValueError, RuntimeError), match="device|meta"):
            getattr(torch.ops.peftkern, op)(*_to_meta(args, index))


@pytest.mark.parametrize("value", [2**32, 2**31, -(2**31) - 1])
def test_row_adapter_values_outside_int32_are_refused_not_wrapped(value):
    base, x = torch.randn(2, 3), torch.randn(2, 4)
    a, b = [torch.randn(2, 4)], [torch.randn(3, 2)]
    with pytest.raises(ValueError, match="outside int32"):
        grouped_ops.lora_grouped(base, x, a, b, [1.0], torch.tensor([value, -1]))
    with pytest.raises(ValueError, match="outside int32"):
        grouped_ops.ia3_grouped_scale(base, torch.ones(1, 3), torch.tensor([value, -1]))
    torch.testing.assert_close(grouped_ops.lora_grouped(base, x, a, b, [1.0], torch.tensor([0, -1])),
                               grouped_ops.lora_grouped_reference(base, x, a, b, [1.0], torch.tensor([0, -1])))  # fmt: skip
