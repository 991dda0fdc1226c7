"""One module per op family: the plain-PyTorch reference (the spec), the fake implementation,
the autograd formula and the wrapper that picks the compiled kernel for a tensor's device or
falls back to the reference. Importing a family module registers its fakes and autograd."""

from . import adapter, cross_entropy, dora, dropout, grouped, ia3, lora, nf4, qlora, rank_product

__all__ = ["adapter", "cross_entropy", "dora", "dropout", "grouped", "ia3", "lora", "nf4", "qlora", "rank_product"]
