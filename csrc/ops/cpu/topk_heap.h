// The running top-k of one query, shared by the cosine top-k kernels: higher score
// first, ties to the lower index.
#pragma once
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace omnifm {
namespace cpu {

template <typename T>
struct Hit {
  T score;
  int64_t index;
};

// a ranks before b: higher score, then lower index.
template <typename T>
inline bool before(const Hit<T>& a, const Hit<T>& b) {
  return a.score > b.score || (a.score == b.score && a.index < b.index);
}

// Min-heap on rank (the worst kept hit on top), capacity k.
template <typename T>
struct TopK {
  std::vector<Hit<T>> heap;
  int64_t k;
  explicit TopK(int64_t k_) : k(k_) { heap.reserve(k_); }
  inline bool full() const { return static_cast<int64_t>(heap.size()) >= k; }
  inline T threshold() const { return full() ? heap.front().score : -std::numeric_limits<T>::infinity(); }
  // Called in increasing index order, so an equal score never wins.
  inline void offer(T score, int64_t index) {
    auto worse_first = [](const Hit<T>& a, const Hit<T>& b) { return before(a, b); };
    if (!full()) {
      heap.push_back({score, index});
      std::push_heap(heap.begin(), heap.end(), worse_first);
    } else if (score > heap.front().score) {
      std::pop_heap(heap.begin(), heap.end(), worse_first);
      heap.back() = {score, index};
      std::push_heap(heap.begin(), heap.end(), worse_first);
    }
  }
  // The kept hits in rank order into scores[0:k], indices[0:k].
  void write_sorted(T* scores, int64_t* indices) {
    TORCH_CHECK(full(), "cosine_topk: internal error, ", heap.size(), " rows kept for k=", k);
    std::sort(heap.begin(), heap.end(), before<T>);
    for (int64_t j = 0; j < k; ++j) {
      scores[j] = heap[j].score;
      indices[j] = heap[j].index;
    }
  }
};

}  // namespace cpu
}  // namespace omnifm
