// The CPU reference lincomb against values computed independently in long double, at awkward
// sizes, with dst aliasing a source.
#include <cmath>
#include <vector>

#include "check.h"
#include "fastdiff/lincomb.h"

namespace {

template <typename T>
void check_size(size_t n, size_t terms) {
  std::vector<std::vector<T>> srcs(terms, std::vector<T>(n));
  std::vector<double> coefs(terms);
  for (size_t j = 0; j < terms; ++j) {
    coefs[j] = std::pow(-0.7, double(j)) * (1.0 + 0.1 * double(j));
    for (size_t i = 0; i < n; ++i) srcs[j][i] = static_cast<T>(std::sin(0.37 * double(i + 1) * double(j + 1)));
  }
  std::vector<const T*> ptrs;
  for (auto& s : srcs) ptrs.push_back(s.data());
  std::vector<T> dst(n);
  fastdiff::lincomb<T>(dst.data(), ptrs.data(), coefs.data(), terms, n);
  for (size_t i = 0; i < n; ++i) {
    long double want = 0;
    for (size_t j = 0; j < terms; ++j) want += static_cast<long double>(coefs[j]) * srcs[j][i];
    // one rounding to T after a double accumulation
    double tol = std::is_same<T, float>::value ? 1.2e-7 : 1e-15;
    CHECK(std::fabs(double(dst[i] - static_cast<T>(want))) <= tol * (1.0 + std::fabs(double(want))),
          "n=%zu terms=%zu i=%zu got %.17g want %.17Lg", n, terms, i, double(dst[i]), want);
  }
  // in place: dst is srcs[0]
  std::vector<T> expect = dst;
  std::vector<T> inplace = srcs[0];
  ptrs[0] = inplace.data();
  fastdiff::lincomb<T>(inplace.data(), ptrs.data(), coefs.data(), terms, n);
  for (size_t i = 0; i < n; ++i) CHECK(inplace[i] == expect[i], "in-place differs at %zu", i);
}

}  // namespace

int main() {
  for (size_t n : {size_t(1), size_t(7), size_t(1023), size_t(3 * 4 * 17 * 19)})
    for (size_t terms : {size_t(1), size_t(2), size_t(5)}) {
      check_size<float>(n, terms);
      check_size<double>(n, terms);
    }
  TEST_MAIN_END();
}
