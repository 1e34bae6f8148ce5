// safetensors read/write round trip, clear errors for truncated or unsupported files, and a PNG
// of the expected layout (tests/test_service.py also opens the service's PNGs with Pillow).
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "check.h"
#include "fastdiff/io.h"

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string io_error(const std::string& path) {
  try {
    fastdiff::load_safetensors(path);
  } catch (const fastdiff::IoError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : ".";
  const std::string path = dir + "/io_test.safetensors";
  fastdiff::HostTensor a{{2, 3}, {1, 2, 3, 4, 5, 6.5f}}, b{{1}, {-7.25f}};
  fastdiff::save_safetensors(path, {{"a", a}, {"b", b}}, {{"note", "quote \" and \\ ok"}});
  const fastdiff::SafeTensors st = fastdiff::load_safetensors(path);
  CHECK(st.at("a").shape == a.shape && st.at("a").data == a.data, "tensor a did not round-trip");
  CHECK(st.at("b").data == b.data, "tensor b did not round-trip");
  CHECK(st.metadata.at("note") == "quote \" and \\ ok", "metadata: %s", st.metadata.at("note").c_str());
  std::string missing;
  try {
    st.at("c");
  } catch (const fastdiff::IoError& e) {
    missing = e.what();
  }
  CHECK(missing.find("no tensor 'c' (the file has: a, b)") != std::string::npos, "%s", missing.c_str());

  const std::string bytes = slurp(path);
  const std::string cut = dir + "/io_test_truncated.safetensors";
  std::ofstream(cut, std::ios::binary) << bytes.substr(0, bytes.size() - 4);
  CHECK(io_error(cut).find("outside the data (truncated?)") != std::string::npos, "%s", io_error(cut).c_str());
  const std::string f16 = dir + "/io_test_f16.safetensors";
  std::string header = "{\"h\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,2]}}";
  std::string doc(8, '\0');
  doc[0] = static_cast<char>(header.size());
  std::ofstream(f16, std::ios::binary) << doc << header << "xx";
  CHECK(io_error(f16).find("tensor 'h' is F16") != std::string::npos, "%s", io_error(f16).c_str());
  CHECK(io_error(dir + "/no_such.safetensors").find("cannot open") != std::string::npos, "missing file");

  // SHA-256 known answers (FIPS 180-4 examples; 55/56/64 bytes cross the padding boundaries)
  CHECK(fastdiff::sha256_hex("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", "sha256('')");
  CHECK(fastdiff::sha256_hex("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256(abc)");
  CHECK(fastdiff::sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq") ==
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
        "sha256 of the 448-bit example");
  CHECK(fastdiff::sha256_hex(std::string(55, 'a')) ==
            "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318",
        "sha256 of 55 bytes");
  CHECK(fastdiff::sha256_hex(std::string(64, 'a')) ==
            "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb",
        "sha256 of 64 bytes");
  CHECK(fastdiff::sha256_hex(std::string(1000000, 'a')) ==
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
        "sha256 of a million a's");

  const std::string png = dir + "/io_test.png";
  std::vector<float> chw(3 * 5 * 7);
  for (size_t i = 0; i < chw.size(); ++i) chw[i] = static_cast<float>(i % 5) / 2.0f - 1.0f;
  const auto rgb = fastdiff::to_rgb8(chw.data(), 3, 5, 7);
  CHECK(rgb.size() == 5 * 7 * 3 && rgb[0] == 0 && rgb[3 * 4] == 255, "to_rgb8 values");
  fastdiff::write_png(png, 7, 5, rgb);
  const std::string p = slurp(png);
  CHECK(p.size() > 33 && p.substr(1, 3) == "PNG" && p.substr(12, 4) == "IHDR", "PNG signature/IHDR");
  CHECK(static_cast<unsigned char>(p[19]) == 7 && static_cast<unsigned char>(p[23]) == 5, "PNG size");
  for (const auto& f : {path, cut, f16, png}) std::remove(f.c_str());
  TEST_MAIN_END();
}
