// File formats the C++ runtime reads and writes without third-party code: safetensors (the
// prompt embeddings a service is given, float32 tensors) and PNG (its images, RGB8,
// zlib stored blocks: larger than a compressed PNG, readable by everything).
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastdiff {

class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<float> data;
  int64_t numel() const;
};

struct SafeTensors {
  std::map<std::string, HostTensor> tensors;
  std::map<std::string, std::string> metadata;  // the file's "__metadata__"
  // The named tensor; throws IoError naming the file's tensors when it is absent.
  const HostTensor& at(const std::string& name) const;
};

// Reads a whole file into `bytes`; false when it cannot be opened (callers name the file in their
// own error type).
bool read_file(const std::string& path, std::string& bytes);

// SHA-256 (FIPS 180-4) of bytes, as 64 lowercase hex digits: what a package manifest records
// per file, so that a damaged file is refused before it is loaded.
std::string sha256_hex(const std::string& bytes);

// Reads a .safetensors file of F32 tensors. Throws IoError for unreadable, truncated or
// malformed files and for other dtypes (naming the tensor and the dtype).
SafeTensors load_safetensors(const std::string& path);

// Writes float32 tensors as a .safetensors file (atomically: a temporary file, then a rename).
void save_safetensors(const std::string& path, const std::map<std::string, HostTensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Writes an RGB8 image (height x width x 3, row-major) as PNG. Throws IoError when the file
// cannot be written.
void write_png(const std::string& path, int width, int height, const std::vector<uint8_t>& rgb);

// [-1, 1] CHW float image (3 channels, or 1 for grey) -> RGB8 HWC, as fastdiff.engines.to_pil.
std::vector<uint8_t> to_rgb8(const float* chw, int channels, int height, int width);

}  // namespace fastdiff
