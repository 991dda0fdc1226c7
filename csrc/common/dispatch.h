// Dtype dispatch for the three floating types peftkern's ops accept. (AT_DISPATCH_FLOATING_TYPES
// would also instantiate double, which every op rejects in its checks: dead code and compile time.)
#pragma once

#include <ATen/Dispatch.h>

#define PK_DISPATCH_FLOAT_HALF_BFLOAT16(TYPE, NAME, ...)       \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
