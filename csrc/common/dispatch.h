// Dtype dispatch for the three floating types of the NF4 and QLoRA ops, which reject double in
// their checks (AT_DISPATCH_FLOATING_TYPES would instantiate it for nothing: dead code and
// compile time). The IA³ and grouped ops also take double, for gradcheck, and use
// AT_DISPATCH_FLOATING_TYPES_AND2.
#pragma once

#include <ATen/Dispatch.h>

#define PK_DISPATCH_FLOAT_HALF_BFLOAT16(TYPE, NAME, ...)       \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
