// A minimal test harness for the C++ tests (ctest runs each executable; non-zero exit = failure).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace fastdiff_test {
inline int failures = 0;

// Deterministic noise in [-1, 1) (an LCG), the same on every platform.
inline std::vector<float> noise(size_t n, unsigned seed) {
  std::vector<float> v(n);
  unsigned s = seed;
  for (auto& x : v) {
    s = s * 1664525u + 1013904223u;
    x = static_cast<float>((s >> 8) & 0xffff) / 32768.0f - 1.0f;
  }
  return v;
}

// max|a - b| / max|a|.
inline double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0.0, scale = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(a[i])));
  }
  return err / std::max(scale, 1e-30);
}
}  // namespace fastdiff_test

#define CHECK(cond, ...)                                                        \
  do {                                                                          \
    if (!(cond)) {                                                              \
      ++fastdiff_test::failures;                                                \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                        \
      std::fprintf(stderr, "\n");                                               \
    }                                                                           \
  } while (0)

#define TEST_MAIN_END()                                                         \
  do {                                                                          \
    if (fastdiff_test::failures) {                                              \
      std::fprintf(stderr, "%d check(s) failed\n", fastdiff_test::failures);    \
      return 1;                                                                 \
    }                                                                           \
    std::printf("all checks passed\n");                                         \
    return 0;                                                                   \
  } while (0)
