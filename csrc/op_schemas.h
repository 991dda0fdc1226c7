// The schema of every kernel op, declared once: by csrc/ops.cpp for the library `peftkern`, and by
// the CUDA emulation (csrc/emu/library.cpp, tests only) for `peftkern_emu`, whose CPU kernels are
// the .cu files compiled as C++. Device implementations register beside their code
// (TORCH_LIBRARY_IMPL in csrc/<family>/*_cpu.cpp, PK_CUDA_LIBRARY_IMPL in *_cuda.cu); fake (meta)
// implementations, autograd formulas and the plain-PyTorch references live in peftkern/ops/.
#pragma once

#include <torch/library.h>

namespace peftkern {

inline void define_kernel_ops(torch::Library& m) {
  // --- NF4 (bitsandbytes-compatible 4-bit NormalFloat), csrc/nf4/ -------------------------------
  // Quantize any float tensor, flattened row-major, in blocks of `blocksize` elements.
  // packed: uint8 [ceil(numel / 2), 1], two codes per byte (bitsandbytes' layout);
  // absmax: float32 [ceil(numel / blocksize)].
  m.def("nf4_quantize(Tensor weight, int blocksize) -> (Tensor packed, Tensor absmax)");
  // Inverse of nf4_quantize: returns a `dtype` tensor of `shape` (numel must match the codes).
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, int[] shape, "
      "ScalarType dtype) -> Tensor");
  // nf4_dequantize with double-quantized absmax (bitsandbytes' compress_statistics):
  // absmax[b] = nested_code[absmax_codes[b]] * nested_absmax[b // nested_blocksize] + offset,
  // decoded on the fly, never written to memory.
  m.def(
      "nf4_dequantize_nested(Tensor packed, Tensor absmax_codes, Tensor nested_absmax, "
      "Tensor nested_code, Tensor nested_offset, int blocksize, int nested_blocksize, int[] shape, "
      "ScalarType dtype) -> Tensor");
  // nf4_dequantize / nf4_dequantize_nested into a caller's buffer (bitsandbytes' dequantize_4bit
  // out=): `out` contiguous, float32 / float16 / bfloat16, on packed's device, with as many elements
  // as the codes (its shape is the caller's); nested_* all given (double quantization, absmax the
  // uint8 codes) or all None. No allocation, so no page faults on a reused buffer.
  m.def(
      "nf4_dequantize_into(Tensor(a!) out, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, int blocksize, int nested_blocksize) -> ()");
  // 8-bit blockwise quantization against a sorted 256-entry code table (used for the absmax
  // values under double quantization). codes: uint8 like x.flatten(); absmax: float32 per block.
  m.def("quantize_blockwise_8bit(Tensor x, Tensor code, int blocksize) -> (Tensor codes, Tensor absmax)");
  // codes -> float32 values: code[codes[i]] * absmax[i // blocksize].
  m.def("dequantize_blockwise_8bit(Tensor codes, Tensor absmax, Tensor code, int blocksize) -> Tensor");
  // The NF4 code table the kernels use (float32 [16], CPU), exported so Python never copies it.
  m.def("nf4_code_table() -> Tensor");

  // --- LoRA dropout without a mask, csrc/dropout/ ----------------------------------------------
  // Element e = i·K + j of x [M, K] is kept iff uniform(Philox word e of stream (seed, offset))
  // < 1 − p (common/philox.h, dropout/dropout_math.h); kept elements scaled by 1/(1 − p).
  // xd = x ⊙ m/(1 − p): x [M, K] any strides, p in [0, 1); a new contiguous [M, K] tensor.
  m.def("lora_dropout(Tensor x, float p, int seed, int offset) -> Tensor");
  // out += x ⊙ m/(1 − p) in place (the LoRA backward's grad_x term); out [M, K] contiguous.
  m.def("lora_dropout_accumulate_(Tensor(a!) out, Tensor x, float p, int seed, int offset) -> ()");
  // The LoRA backward's two dropout passes in one draw: grad_x += grad_xd ⊙ m/(1 − p) in place and
  // returns xd = x ⊙ m/(1 − p) (for grad_A's GEMM). grad_xd, x [M, K] any strides; grad_x [M, K]
  // contiguous, overlapping neither.
  m.def("lora_dropout_backward_(Tensor(a!) grad_x, Tensor grad_xd, Tensor x, float p, int seed, int offset) -> Tensor");
  // The A-projection with the dropout drawn where x is read: xa = lora_dropout(x, p, seed, offset)·lora_aᵀ
  // [M, r] in x's dtype, x [M, K] any strides, lora_a [r, K]. On CPU with AVX-512 (float, bf16,
  // fp16, p > 0) one pass, xd never written (float accumulation); elsewhere lora_dropout then the
  // GEMM (x·Aᵀ alone when p = 0).
  m.def("lora_dropout_project(Tensor x, Tensor lora_a, float p, int seed, int offset) -> Tensor");
  // The keep decisions m (bool, x's shape, element e = flat row-major index) that lora_dropout
  // applies; tests and the plain-PyTorch reference only (the LoRA ops never materialise it).
  m.def("lora_dropout_mask(Tensor x, float p, int seed, int offset) -> Tensor");
  // The float32 uniforms (word >> 8)·2⁻²⁴ of elements 0 .. numel − 1 of stream (seed, offset),
  // in x's shape (x gives only shape and device).
  m.def("philox_uniform(Tensor x, int seed, int offset) -> Tensor");
  // Raw Philox4x32-10 words of counter blocks: groups int64 [G] (read as uint64) ->
  // int64 [G, 4], counter (group, offset), key seed (checked against Random123's vectors).
  m.def("philox_words(Tensor groups, int seed, int offset) -> Tensor");

  // --- LoRA on dense bases, csrc/lora/ ---------------------------------------------------------
  // out = x·Wᵀ + b + scaling·(xd·Aᵀ)·Bᵀ with xd = lora_dropout(x, dropout_p, seed, offset)
  // (xd = x when dropout_p = 0). x [M, K], weight [N, K], bias [N], lora_a [r, K], lora_b [N, r].
  // Also returns xa = xd·Aᵀ [M, r], which the backward reuses.
  m.def(
      "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scaling, float dropout_p, int seed, int offset) -> (Tensor out, Tensor xa)");
  // Gradients of lora_linear_fwd for x, lora_a and lora_b (the base weight and bias are frozen);
  // draws the forward's dropout decisions again from (seed, offset): no mask, no xd stored.
  m.def(
      "lora_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor xa, float scaling, float dropout_p, int seed, int offset) -> "
      "(Tensor grad_x, Tensor grad_a, Tensor grad_b)");

  // --- The rank-r products of a LoRA backward, csrc/rank_product/ ------------------------------
  // One pass over grad_out [M, N] for both of its thin products: grad_xa = scaling·grad_out·lora_b
  // [M, r] and grad_b = scaling·grad_outᵀ·xa [N, r]; xa [M, r], lora_b [N, r].
  m.def("lora_out_grads(Tensor grad_out, Tensor xa, Tensor lora_b, float scaling) -> (Tensor grad_xa, Tensor grad_b)");
  // One pass over x [M, K] and grad_x: grad_x += (grad_xa·lora_a) ⊙ m/(1 − p) in place and returns
  // grad_a = grad_xaᵀ·(x ⊙ m/(1 − p)) [r, K], the dropout decisions m drawn again from (seed, offset)
  // as lora_dropout draws them (m = 1 when p = 0). grad_xa [M, r], lora_a [r, K]; grad_x x's shape,
  // contiguous when p > 0.
  m.def(
      "lora_input_grads_(Tensor(a!) grad_x, Tensor x, Tensor grad_xa, Tensor lora_a, float p, int seed, "
      "int offset) -> Tensor");

  // --- QLoRA at decode sizes, csrc/qlora/ ----------------------------------------------------------
  // out[t, o] = sum_i x[t, i]·deq(W)[o, i] + bias[o] + scaling·(xa[t]·lora_b[o]) for an NF4 weight
  // W [out_features, K] (absmax float32, or uint8 codes with the nested_* tensors under double
  // quantization) and xa = x·Aᵀ [T, r] from the caller; x [T, K] with contiguous rows. Reads the
  // 4-bit weight once and never writes it dequantized: the path for few tokens (decode).
  m.def(
      "nf4_lora_gemv(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, int blocksize, int nested_blocksize, "
      "int out_features, Tensor? bias, Tensor? xa, Tensor? lora_b, float scaling) -> Tensor");

  // --- QLoRA training and prefill on CPU: fused NF4 dequant + GEMM, csrc/qlora/qlora_gemm_cpu.cpp --
  // out = x·deq(W)ᵀ + bias + scaling·xa·lora_bᵀ for x [M, K] (any strides), W [out_features, K] in
  // NF4 (as nf4_lora_gemv), bias [out_features], xa = dropout(x)·Aᵀ [M, r], lora_b [out_features, r],
  // all in x's dtype. W is decoded a tile at a time into a per-thread buffer of about tile_bytes
  // (0: the default) that feeds the GEMM; the dense weight is never materialised. CPU only.
  m.def(
      "nf4_lora_linear_fwd(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, int blocksize, int nested_blocksize, "
      "int out_features, Tensor? bias, Tensor? xa, Tensor? lora_b, float scaling, int tile_bytes) -> Tensor");
  // grad_x = grad_out·deq(W) + grad_xa·lora_a for grad_out [M, N], W [N, in_features] in NF4,
  // grad_xa = scaling·grad_out·B [M, r] and lora_a [r, in_features] (both optional; a dropout mask
  // is applied by the caller to its own LoRA term instead). Tiled like nf4_lora_linear_fwd. CPU only.
  m.def(
      "nf4_lora_linear_bwd_input(Tensor grad_out, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, int blocksize, int nested_blocksize, "
      "int in_features, Tensor? grad_xa, Tensor? lora_a, int tile_bytes) -> Tensor");
  // The QLoRA layer's training forward as one op, for a backward in C++ (csrc/qlora/qlora_train.cpp,
  // Autograd key): xa = lora_dropout_project(x, lora_a, dropout_p, seed, offset) [M, r] and
  // out = nf4_lora_linear_fwd(x, W, bias, xa, lora_b, scaling); returns (out, xa). lora_a [r, K] and
  // lora_b [out_features, r] in x's dtype, r >= 0. Gradients for x, bias, lora_a and lora_b; the
  // dropout decisions drawn again in backward, no mask. CPU only.
  m.def(
      "nf4_lora_linear_train(Tensor x, Tensor packed, Tensor absmax, Tensor? nested_absmax, "
      "Tensor? nested_code, Tensor? nested_offset, int blocksize, int nested_blocksize, int out_features, "
      "Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, float dropout_p, int seed, int offset) "
      "-> (Tensor out, Tensor xa)");

  // --- DoRA, csrc/dora/ ---------------------------------------------------------------------------
  // norms[i] = || W[i, :] + scaling * (B[i, :] @ A) ||_2 over the input dim, for weight [N, K],
  // lora_a [r, K], lora_b [N, r]: DoRA's (detached) weight norm in one pass, never forming
  // W + scaling * B @ A. Output [N] in the weight's dtype, accumulated in float32.
  m.def("dora_weight_norm(Tensor weight, Tensor lora_a, Tensor lora_b, float scaling) -> Tensor");

  // --- IA³ on dense bases, csrc/ia3/ ----------------------------------------------------------
  // Input scaling (PEFT's feedforward modules): out = (x ⊙ l)·Wᵀ + b for x [M, K], weight [N, K],
  // bias [N], ia3_l with K elements (any shape, PEFT's is [1, K]); read in float32 (double for
  // double x) whatever its dtype.
  m.def("ia3_input_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor ia3_l) -> Tensor");
  // Its gradients for x and ia3_l (W and b frozen): dx = (dy·W) ⊙ l, dl = Σ_rows x ⊙ (dy·W),
  // the last two in one fused pass. grad_l has ia3_l's shape and dtype.
  m.def(
      "ia3_input_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor ia3_l) -> "
      "(Tensor grad_x, Tensor grad_l)");
  // Output scaling (attention k/v): out = (x·Wᵀ + b) ⊙ l with ia3_l of N elements ([N, 1] in
  // PEFT). Also returns pre = x·Wᵀ + b [M, N], which the backward reads instead of x.
  m.def(
      "ia3_output_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor ia3_l) -> "
      "(Tensor out, Tensor pre)");
  // Its gradients: dx = (dy ⊙ l)·W, dl = Σ_rows dy ⊙ pre (dy ⊙ l and dl in one fused pass).
  m.def(
      "ia3_output_linear_bwd(Tensor grad_out, Tensor pre, Tensor weight, Tensor ia3_l) -> "
      "(Tensor grad_x, Tensor grad_l)");

  // --- Bottleneck adapters (AdapterHub semantics), csrc/adapter/ ------------------------------
  // out = residual + s·(act(x·W_downᵀ + b_down)·W_upᵀ + b_up), s = scaling·scale[0] (scale: an
  // optional 1-element learned scalar). x, residual [M, d]; w_down [m, d]; b_down [m]; w_up
  // [d, m]; b_up [d]; activation 0 relu, 1 gelu (erf), 2 gelu_tanh, 3 silu. Also returns the
  // pre-activation pre = x·W_downᵀ + b_down [M, m], which backward recomputes act from.
  m.def(
      "adapter_bottleneck_fwd(Tensor x, Tensor residual, Tensor w_down, Tensor b_down, Tensor w_up, "
      "Tensor b_up, float scaling, Tensor? scale, int activation) -> (Tensor out, Tensor pre)");
  // Gradients of adapter_bottleneck_fwd (the residual's is grad_out itself); grad_scale is [0]
  // without a scale tensor.
  m.def(
      "adapter_bottleneck_bwd(Tensor grad_out, Tensor x, Tensor pre, Tensor w_down, Tensor w_up, "
      "Tensor b_up, float scaling, Tensor? scale, int activation) -> (Tensor grad_x, Tensor grad_w_down, "
      "Tensor grad_b_down, Tensor grad_w_up, Tensor grad_b_up, Tensor grad_scale)");

  // --- Grouped (mixed-adapter) inference, csrc/grouped/ ------------------------------------------
  // A batch whose rows belong to different adapters (punica / S-LoRA style), one call per layer.
  // row_adapter int32 [T], values in [-1, G): the adapter of each row, -1 = none (the base alone).
  //
  // LoRA: out[t] = base_out[t] + scaling[g]·(x[t]·A[g]ᵀ)·B[g]ᵀ for g = row_adapter[t] >= 0, else
  // base_out[t]. base_out [T, N], x [T, K] (same dtype); the G adapters as lists, each as nn.Linear
  // holds it: lora_a[g] [r_g, K], lora_b[g] [N, r_g] (ranks may differ, 0 allowed), scaling[g];
  // every adapter tensor of one dtype, x's or float32. Accumulated in float32 (float64 for double),
  // rounded once. A new contiguous [T, N] tensor; base_out is not modified.
  m.def(
      "lora_grouped_fwd(Tensor base_out, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float[] scaling, "
      "Tensor row_adapter) -> Tensor");
  // IA³: out[r, f] = t[r, f]·scales[g, f] for g = row_adapter[r] >= 0, else t[r, f]. t [T, F],
  // scales [G, F] float32 (float64 for double t); each product rounded once to t's dtype. A new
  // contiguous [T, F] tensor.
  m.def("ia3_grouped_scale(Tensor t, Tensor scales, Tensor row_adapter) -> Tensor");

  // --- Scaled LoRA (VeRA, AdaLoRA), csrc/scaled_lora/ ---------------------------------------------
  // out = x·Wᵀ + b + scaling·((xd·Aᵀ ⊙ rank_scale)·Bᵀ) ⊙ out_scale, xd = lora_dropout(x, dropout_p, seed, offset).
  // x [M, K], weight [N, K], bias [N], lora_a [r, K], lora_b [N, r] (any strides: VeRA's slices of
  // its shared matrices), rank_scale r elements (VeRA λ_d, AdaLoRA E [r, 1]) and out_scale N
  // elements (VeRA λ_b), both optional, read in float32 (double for double x). Returns xa = xd·Aᵀ.
  m.def(
      "scaled_lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "Tensor? rank_scale, Tensor? out_scale, float scaling, float dropout_p, int seed, int offset) -> "
      "(Tensor out, Tensor xa)");
  // Gradients of scaled_lora_linear_fwd: grad_x always; grad_a, grad_b, grad_rank_scale,
  // grad_out_scale where output_mask says so (else [0]: frozen A / B cost no GEMM). The scale
  // gradients (dλ, dE) are column sums over the backward's own intermediates; deterministic.
  m.def(
      "scaled_lora_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor xa, Tensor? rank_scale, Tensor? out_scale, float scaling, float dropout_p, int seed, int offset, "
      "bool[4] output_mask) -> (Tensor grad_x, Tensor grad_a, Tensor grad_b, Tensor grad_rank_scale, "
      "Tensor grad_out_scale)");

  // --- ReLoRA, csrc/relora/ ----------------------------------------------------------------------
  // (packed', absmax') = nf4_quantize(deq(packed, absmax) + scaling·lora_b·lora_a) per block, never
  // writing the dense weight. packed uint8 [ceil(n / 2), 1], absmax float32 [blocks] (decoded),
  // lora_a float32 [r, in], lora_b float32 [out, r], shape [out, in]. See csrc/relora/relora_math.h.
  m.def(
      "nf4_merge_lowrank(Tensor packed, Tensor absmax, Tensor lora_a, Tensor lora_b, float scaling, "
      "int blocksize, int[] shape) -> (Tensor packed_out, Tensor absmax_out)");

  // --- Proxy-tuning, csrc/proxy/ -------------------------------------------------------------------
  // One decode step's filtered logits, float32 [B, V]: z = (base + alpha·(expert − anti_expert)) / T,
  // then top-k and top-p as transformers' warpers (removed tokens -inf; top_k 0 / top_p 1: off).
  // base [B, V]; expert, anti_expert [B, >= V] (only the first V columns read); any strides.
  // See peftkern/ops/proxy.py for the exact semantics (ties, min_tokens_to_keep, NaN rows).
  m.def(
      "proxy_logits(Tensor base, Tensor expert, Tensor anti_expert, float alpha, float temperature, int top_k, "
      "float top_p, int min_tokens_to_keep) -> Tensor");
  // --- Fused cross-entropy, csrc/cross_entropy/ ---------------------------------------------------
  // Per-row cross-entropy of logits [rows, vocab] (float32 / bf16 / fp16, computed in float32)
  // against int64 labels [rows], without writing log-probabilities: loss[r] = lse[r] - logits[r, y],
  // lse[r] = logsumexp(logits[r]); both float32 [rows], 0 where labels[r] == ignore_index.
  // See csrc/cross_entropy/cross_entropy_math.h and peftkern/ops/cross_entropy.py.
  m.def("cross_entropy_fwd(Tensor logits, Tensor labels, int ignore_index) -> (Tensor loss, Tensor lse)");
  // d(sum_r grad_loss[r] * loss[r]) / d logits, in logits' dtype, contiguous [rows, vocab]:
  // grad_loss[r] * (softmax(logits[r]) - onehot(labels[r])), from cross_entropy_fwd's lse; 0 rows
  // where labels[r] == ignore_index.
  m.def(
      "cross_entropy_bwd(Tensor grad_loss, Tensor logits, Tensor labels, Tensor lse, int ignore_index) -> Tensor");
  // --- Child-Tuning's fused masked AdamW, csrc/masked_adamw/ -----------------------------------
  // One AdamW step of ChildTuningAdamW on one tensor, in place: g = grad ⊙ M; moments; p += -step_size·m /
  // (sqrt(v) + eps); p += -lr·wd·p. M: bit e of mask_bits (uint8 [ceil(n / 8)], mode D), else keep/reserve_p
  // with keep = Philox(seed, offset, e) < reserve_p (mode F; reserve_p 1 = AdamW). param and grad float32 /
  // bf16 / fp16, moments float32, all of param's shape. See csrc/masked_adamw/masked_adamw_math.h.
  m.def(
      "masked_adamw_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor? mask_bits, "
      "float reserve_p, int seed, int offset, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float step_size) -> ()");
  // Mode F's keep decisions for a tensor shaped like `like` (bool, like's device): the mask masked_adamw_
  // applies for the same (reserve_p, seed, offset), materialised for tests.
  m.def("masked_adamw_keep_mask(Tensor like, float reserve_p, int seed, int offset) -> Tensor");
}

}  // namespace peftkern
