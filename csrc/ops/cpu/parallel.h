// Work split over torch's intra-op threads from this extension. at::parallel_for is a
// header template that runs serially in an extension built without -fopenmp (this
// one); TensorIterator::for_each calls it from inside libtorch, which is built with
// OpenMP, so the work runs on torch's own thread pool (no second pool competing for
// the cores). Inside a parallel region (or with one thread) it runs serially.
#pragma once
#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>

#include <cstdint>

namespace omnifm {
namespace cpu {

// Below this many multiply-adds (or comparable steps) a call runs on the calling thread:
// waking torch's other threads costs more than such a call's work, most of all inside a
// training step, where they have gone to sleep between the backbone's large ops.
// (VQA's training step, where the ECA core is ~70K and the spectral bins ~110K
// multiply-adds and the spectral head 5-10M: 1.157x FedAvg with this floor, 1.166x
// without, over 200 interleaved rounds; every call serial was slower, 1.203x.)
constexpr int64_t kMinParallelWork = int64_t{1} << 20;

// f(begin, end) over contiguous ranges covering [0, n), each range on one thread and
// in increasing order within a thread; at::get_thread_num() names the thread inside f.
// work: the whole call's multiply-adds; a small call runs serially, as f(0, n).
template <typename F>
void parallel_ranges(int64_t n, int64_t work, const F& f) {
  if (n <= 0) return;
  if (work < kMinParallelWork) {
    f(0, n);
    return;
  }
  const at::Tensor ids = at::arange(n, at::kLong);
  at::TensorIterator iter = at::TensorIteratorConfig().add_const_input(ids).build();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t size) {
        const int64_t first = *reinterpret_cast<const int64_t*>(data[0]);
        f(first, first + size);  // ids are contiguous: the range is [first, first + size)
      },
      1);
}

// f(task) for each task in [0, n).
template <typename F>
void parallel_tasks(int64_t n, int64_t work, const F& f) {
  parallel_ranges(n, work, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

}  // namespace cpu
}  // namespace omnifm
