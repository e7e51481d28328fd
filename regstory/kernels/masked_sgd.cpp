// SGD with momentum whose gradients are first multiplied by 0/1 pruning masks, in one pass over memory.
//
// Per element, the update of torch's SGD with momentum on the masked gradient:
//   d = g * m;  d += wd * w;  v = mu * v + (1 - dampening) * d;  d = nesterov ? d + mu * v : v;  w -= lr * d
// A parameter without a mask (None) takes the same update with m = 1, so one call covers an optimizer group.
// With store_masked_grads, a masked gradient is overwritten by g * m in the same pass (one store, no extra read),
// so the gradient tensors end as the two-pass path leaves them; unmasked gradients are never written.
// It equals a mask pass followed by torch's fused SGD kernel up to rounding: that kernel fuses some multiply-adds
// in its vector body and not in its scalar tail, so the two can differ in the last bit of an entry.
// Only called on momentum buffers that already exist (torch's own step creates them on the first step).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>

#include <optional>
#include <vector>

namespace {

bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.defined() && a.device().is_cpu() && a.scalar_type() == at::kFloat && a.sizes() == b.sizes() &&
         a.strides() == b.strides() && a.is_non_overlapping_and_dense();
}

struct Hyper {
  float minus_lr, mu, keep, wd;
  bool nesterov;
};

template <bool kMasked, bool kStoreGrad>
void update_range(float* __restrict__ w, float* __restrict__ g, float* __restrict__ v,
                  const float* __restrict__ m, int64_t count, const Hyper h) {
  for (int64_t i = 0; i < count; ++i) {
    float d = kMasked ? g[i] * m[i] : g[i];
    if (kStoreGrad) g[i] = d;
    if (h.wd != 0.0f) d += w[i] * h.wd;
    const float vi = v[i] * h.mu + d * h.keep;
    v[i] = vi;
    d = h.nesterov ? d + vi * h.mu : vi;
    w[i] += d * h.minus_lr;
  }
}

void update_chunk(char** data, int64_t count, bool masked, bool store_grad, const Hyper& h) {
  auto* w = reinterpret_cast<float*>(data[0]);
  auto* v = reinterpret_cast<float*>(data[1]);
  auto* g = reinterpret_cast<float*>(data[2]);
  const auto* m = reinterpret_cast<const float*>(data[3]);
  if (masked && store_grad) {
    update_range<true, true>(w, g, v, m, count, h);
  } else if (masked) {
    update_range<true, false>(w, g, v, m, count, h);
  } else {
    update_range<false, false>(w, g, v, nullptr, count, h);
  }
}

// A dense tensor's elements fill one block of memory, and tensors with the same strides hold corresponding
// elements at the same offsets, so every tensor is updated as one flat array.
at::Tensor flat(const at::Tensor& t) { return t.as_strided({t.numel()}, {1}); }

void update_tensor(const at::Tensor& w, const at::Tensor& g, const at::Tensor& v, const std::optional<at::Tensor>& m,
                   bool store_masked_grad, const Hyper& h) {
  const bool masked = m.has_value();
  const bool store_grad = masked && store_masked_grad;
  if (w.numel() <= at::internal::GRAIN_SIZE || at::get_num_threads() == 1) {  // nothing to split over threads
    char* data[4] = {static_cast<char*>(w.data_ptr()), static_cast<char*>(v.data_ptr()),
                     static_cast<char*>(g.data_ptr()), masked ? static_cast<char*>(m->data_ptr()) : nullptr};
    update_chunk(data, w.numel(), masked, store_grad, h);
    return;
  }
  // torch's TensorIterator splits the work over torch's own intra-op threads (at::parallel_for inlined here would
  // run serially: the extension is not built with OpenMP)
  const at::Tensor fw = flat(w), fv = flat(v), fg = flat(g);
  at::TensorIteratorConfig config;
  config.set_check_mem_overlap(false).check_all_same_dtype(true).resize_outputs(false);
  config.add_output(fw).add_output(fv);
  if (store_grad) {  // outputs come first in data[]: the gradient is data[2] either way
    config.add_output(fg);
  } else {
    config.add_const_input(fg);
  }
  at::Tensor fm;
  if (masked) {
    fm = flat(*m);
    config.add_const_input(fm);
  }
  auto iter = config.build();
  iter.for_each([&](char** data, const int64_t* strides, int64_t count) {
    for (int k = 0; k < (masked ? 4 : 3); ++k) {
      TORCH_INTERNAL_ASSERT(strides[k] == sizeof(float), "masked_sgd_: flat operands must stay contiguous");
    }
    update_chunk(data, count, masked, store_grad, h);
  });
}

}  // namespace

// Returns false, changing nothing, when any tensor is not a dense fp32 CPU tensor laid out like its parameter.
bool masked_sgd_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& bufs, const std::vector<std::optional<at::Tensor>>& masks,
                 double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                 bool store_masked_grads) {
  const size_t n = params.size();
  if (grads.size() != n || bufs.size() != n || masks.size() != n) return false;
  for (size_t t = 0; t < n; ++t) {
    const at::Tensor& p = params[t];
    if (!same_dense_layout(p, p) || !same_dense_layout(grads[t], p) || !same_dense_layout(bufs[t], p) ||
        (masks[t].has_value() && !same_dense_layout(*masks[t], p))) {
      return false;
    }
  }
  const Hyper h{static_cast<float>(-lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                static_cast<float>(weight_decay), nesterov};
  for (size_t t = 0; t < n; ++t) {
    update_tensor(params[t], grads[t], bufs[t], masks[t], store_masked_grads, h);
  }
  return true;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("masked_sgd_", &masked_sgd_, "masked SGD-with-momentum step (regstory)");
}
