// Minimal JSON reader for StepPlan files (no third-party dependency in the core library).
// Accepts strict JSON plus the tokens NaN, Infinity and -Infinity that Python's json module
// writes for non-finite floats, so that such files are reported as "non-finite values" by the
// validator rather than as unreadable.
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastdiff::json {

struct ParseError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Value {
  enum class Kind { Null, Bool, Number, String, Array, Object };
  Kind kind = Kind::Null;
  bool boolean = false;
  double number = 0.0;
  bool is_integer = false;  // number written without fraction or exponent
  std::string string;
  std::vector<Value> array;
  std::map<std::string, Value> object;

  const Value* find(const std::string& key) const;
  static const char* kind_name(Kind kind);
};

// Parses a whole document; throws ParseError("... at offset N") on malformed or truncated text.
Value parse(const std::string& text);

}  // namespace fastdiff::json
