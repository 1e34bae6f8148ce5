// A minimal test harness for the C++ tests (ctest runs each executable; non-zero exit = failure).
#pragma once

#include <cstdio>
#include <string>

namespace fastdiff_test {
inline int failures = 0;
}

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
