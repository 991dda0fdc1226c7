# TEMPORARY (lead's stand-in until the helper's grouped op family lands): references only.
import torch


def lora_grouped(base_out, x, lora_a, lora_b_t, scaling, row_adapter):
    out = base_out.reshape(-1, base_out.shape[-1]).clone()
    x2 = x.reshape(-1, x.shape[-1])
    for g in range(lora_a.shape[0]):
        idx = (row_adapter == g).nonzero().flatten()
        if idx.numel():
            delta = (x2[idx].float() @ lora_a[g].float().t()) @ lora_b_t[g].float() * scaling[g]
            out[idx] = (out[idx].float() + delta).to(out.dtype)
    return out.view(base_out.shape)


def ia3_grouped_scale(t, scales, row_adapter):
    t2 = t.reshape(-1, t.shape[-1])
    ones = torch.ones_like(scales[:1])
    table = torch.cat([scales, ones])
    idx = torch.where(row_adapter >= 0, row_adapter.long(), scales.shape[0])
    return (t2.to(scales.dtype) * table[idx]).to(t.dtype).view(t.shape)
