#include "fastdiff/aoti.h"

#include <cmath>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/headeronly/version.h>


#include "../runtime/json.h"

namespace fastdiff {
namespace {

std::string read_text(const std::string& path) {
  std::string text;
  if (!read_file(path, text)) throw PackageError("cannot open '" + path + "'");
  return text;
}

const json::Value& field(const json::Value& doc, const std::string& key, json::Value::Kind kind,
                         const std::string& where) {
  const json::Value* v = doc.find(key);
  if (v == nullptr || v->kind != kind)
    throw PackageError(where + ": field '" + key + "' is missing or is not a " + json::Value::kind_name(kind));
  return *v;
}

// A whole number in [lo, hi] (checked before the cast: a double outside int64 is undefined behaviour).
int64_t whole(const json::Value& v, double lo, double hi, const std::string& what) {
  if (v.kind != json::Value::Kind::Number || !(v.number >= lo && v.number <= hi) || v.number != std::floor(v.number))
    throw PackageError(what + " must be a whole number in [" + std::to_string(static_cast<int64_t>(lo)) + ", " +
                       std::to_string(static_cast<int64_t>(hi)) + "]");
  return static_cast<int64_t>(v.number);
}

// `count` sizes, each in [1, 2^31).
std::vector<int64_t> dims(const json::Value& v, size_t count, const std::string& what) {
  if (v.array.size() != count)
    throw PackageError(what + " must hold " + std::to_string(count) + " sizes, got " + std::to_string(v.array.size()));
  std::vector<int64_t> out;
  for (const auto& x : v.array) out.push_back(whole(x, 1, 2147483647.0, what + " entries"));
  return out;
}

// A file name inside the package directory: no directories, nothing hidden, no way out of it.
std::string file_name(const json::Value& v, const std::string& what) {
  const std::string& s = v.string;
  if (s.empty() || s[0] == '.' || s.find('/') != std::string::npos || s.find('\\') != std::string::npos ||
      s.find('\0') != std::string::npos)
    throw PackageError(what + " must name a file inside the package directory, got '" + s + "'");
  return s;
}

std::string join(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return "[" + s + "]";
}

}  // namespace

std::string torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

AOTIModule::AOTIModule(const std::string& path, size_t runners) : path_(path) {
  try {
    loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(path, "model", false, runners);
  } catch (const std::exception& e) {
    throw PackageError("cannot load the AOTInductor package '" + path + "': " + e.what());
  }
}

AOTIModule::~AOTIModule() = default;

std::vector<at::Tensor> AOTIModule::run(const std::vector<at::Tensor>& inputs) const {
  return loader_->run(inputs);
}

std::string AOTIModule::metadata(const std::string& key) const {
  const auto all = loader_->get_metadata();
  const auto it = all.find(key);
  return it == all.end() ? std::string() : it->second;
}

// The compiled code reads its inputs without checking their shapes: the manifest's shapes must
// be the ones it was compiled for (recorded in its metadata, covered by the file's SHA-256).
static void check_compiled_shape(const AOTIModule& module, const std::string& key, const std::vector<int64_t>& want) {
  const std::string compiled = module.metadata("fastdiff." + key);
  if (compiled != join(want))
    throw PackageError("the manifest's " + key + " " + join(want) + " is not what '" + module.path() +
                       "' was compiled for (" + (compiled.empty() ? std::string("not recorded") : compiled) +
                       "): the manifest was edited, or the package mixes files of two exports");
}

PackageManifest read_manifest(const std::string& dir) {
  const std::string path = dir + "/package.json";
  json::Value doc;
  try {
    doc = json::parse(read_text(path));
  } catch (const json::ParseError& e) {
    throw PackageError("'" + path + "' is not valid JSON: " + e.what());
  }
  if (doc.kind != json::Value::Kind::Object) throw PackageError("'" + path + "' must hold a JSON object");
  const json::Value* format = doc.find("format");
  if (format == nullptr || format->kind != json::Value::Kind::String || format->string != "fastdiff.aoti")
    throw PackageError("'" + path + "' is not a fastdiff AOTI package manifest (expected format 'fastdiff.aoti')");
  const json::Value& version = field(doc, "version", json::Value::Kind::Number, path);
  if (version.number != 2)
    throw PackageError("'" + path + "' has package version " + std::to_string(version.number) +
                       "; this runtime reads 2 (packages carry the SHA-256 of their files since version 2): " +
                       "re-export it with `fastdiff export --format aoti`");
  PackageManifest m;
  m.model = field(doc, "model", json::Value::Kind::String, path).string;
  m.torch = field(doc, "torch", json::Value::Kind::String, path).string;
  m.device = field(doc, "device", json::Value::Kind::String, path).string;
  if (m.torch != torch_version())
    throw PackageError("the package in '" + dir + "' was built by torch " + m.torch + " but this runtime uses torch " +
                       torch_version() + ": AOTInductor packages only load into the torch that built them; " +
                       "re-export it with `fastdiff export --format aoti`");
  if (m.device != "cpu" && !(m.device == "cuda" && at::hasCUDA()))
    throw PackageError("the package in '" + dir + "' was built for " + m.device +
                       ", which this runtime cannot use (this build samples on the CPU)");
  m.prediction_type = field(doc, "prediction_type", json::Value::Kind::String, path).string;
  const json::Value* fp = doc.find("schedule_fingerprint");
  if (fp != nullptr && fp->kind == json::Value::Kind::String) m.schedule_fingerprint = fp->string;
  m.plan_file = file_name(field(doc, "plan", json::Value::Kind::String, path), path + " plan");
  m.latent_shape = dims(field(doc, "latent_shape", json::Value::Kind::Array, path), 3, path + " latent_shape");
  m.cond_shape = dims(field(doc, "cond_shape", json::Value::Kind::Array, path), 2, path + " cond_shape");
  const json::Value& prompts = field(doc, "prompts", json::Value::Kind::Object, path);
  m.prompts_file = file_name(field(prompts, "file", json::Value::Kind::String, path + " prompts"), path + " prompts file");
  m.guidance_scale = field(prompts, "guidance_scale", json::Value::Kind::Number, path + " prompts").number;
  if (!(m.guidance_scale >= 0 && m.guidance_scale <= 1e6))
    throw PackageError(path + " prompts: guidance_scale must be a number in [0, 1e6]");
  for (const auto& t : field(prompts, "texts", json::Value::Kind::Array, path + " prompts").array) {
    if (t.kind != json::Value::Kind::String) throw PackageError(path + " prompts: texts must be strings");
    m.prompts.push_back(t.string);
  }
  auto module = [&](const json::Value& entry, const std::string& name, std::string& file, int64_t& lo, int64_t& hi) {
    const std::string where = path + " " + name;
    file = file_name(field(entry, "file", json::Value::Kind::String, where), where + " file");
    lo = whole(field(entry, "min_batch", json::Value::Kind::Number, where), 1, 2147483647.0, where + " min_batch");
    hi = whole(field(entry, "max_batch", json::Value::Kind::Number, where), 1, 2147483647.0, where + " max_batch");
    if (lo > hi) throw PackageError(where + ": min_batch " + std::to_string(lo) + " is above max_batch " + std::to_string(hi));
  };
  module(field(doc, "unet", json::Value::Kind::Object, path), "unet", m.unet_file, m.unet_min_batch, m.unet_max_batch);
  const json::Value* vae = doc.find("vae");
  if (vae != nullptr && vae->kind == json::Value::Kind::Object) {
    m.has_vae = true;
    module(*vae, "vae", m.vae_file, m.vae_min_batch, m.vae_max_batch);
    m.image_shape = dims(field(doc, "image_shape", json::Value::Kind::Array, path), 3, path + " image_shape");
  } else if (vae != nullptr && vae->kind != json::Value::Kind::Null) {
    throw PackageError(path + ": field 'vae' must be an object or null");
  }
  // Every file the package loads, with its SHA-256: a damaged or swapped file is refused before
  // any of it is parsed or its compiled code is loaded.
  const json::Value& files = field(doc, "files", json::Value::Kind::Object, path);
  std::vector<std::string> used{m.plan_file, m.prompts_file, m.unet_file};
  if (m.has_vae) used.push_back(m.vae_file);
  for (const auto& name : used) {
    const json::Value* digest = files.find(name);
    if (digest == nullptr || digest->kind != json::Value::Kind::String || digest->string.rfind("sha256:", 0) != 0 ||
        digest->string.size() != 7 + 64)
      throw PackageError(path + " files: no 'sha256:<64 hex digits>' entry for '" + name + "'");
    m.sha256[name] = digest->string.substr(7);
  }
  return m;
}

static void verify_file(const std::string& dir, const std::string& name, const std::string& sha256) {
  const std::string path = dir + "/" + name;
  std::string bytes;
  if (!read_file(path, bytes)) throw PackageError("cannot open '" + path + "' (listed in the package's manifest)");
  const std::string got = sha256_hex(bytes);
  if (got != sha256)
    throw PackageError("'" + path + "' is damaged or was replaced: its SHA-256 is " + got + ", the manifest records " +
                       sha256 + "; re-export the package with `fastdiff export --format aoti`");
}

AOTIPackage::AOTIPackage(const std::string& dir, size_t runners) : dir_(dir), manifest_(read_manifest(dir)) {
  for (const auto& [name, digest] : manifest_.sha256) verify_file(dir, name, digest);
  plan_ = load_plan(dir + "/" + manifest_.plan_file);
  check_plan(plan_);
  const SafeTensors prompts = load_safetensors(dir + "/" + manifest_.prompts_file);
  auto tensor = [](const HostTensor& t) {
    return at::from_blob(const_cast<float*>(t.data.data()), t.shape, at::kFloat).clone();
  };
  cond_ = tensor(prompts.at("cond"));
  if (cond_.dim() != 3 || std::vector<int64_t>(cond_.sizes().begin() + 1, cond_.sizes().end()) != manifest_.cond_shape)
    throw PackageError("prompts 'cond' has shape " + join(cond_.sizes().vec()) + ", expected [P] + " +
                       join(manifest_.cond_shape));
  if (manifest_.guidance_scale > 1) {
    uncond_ = tensor(prompts.at("uncond"));
    if (uncond_.dim() != 3 || uncond_.size(0) != 1 ||
        std::vector<int64_t>(uncond_.sizes().begin() + 1, uncond_.sizes().end()) != manifest_.cond_shape)
      throw PackageError("prompts 'uncond' has shape " + join(uncond_.sizes().vec()) + ", expected [1] + " +
                         join(manifest_.cond_shape));
  }
  unet_ = std::make_unique<AOTIModule>(dir + "/" + manifest_.unet_file, runners);
  check_compiled_shape(*unet_, "latent_shape", manifest_.latent_shape);
  check_compiled_shape(*unet_, "cond_shape", manifest_.cond_shape);
  if (manifest_.has_vae) {
    vae_ = std::make_unique<AOTIModule>(dir + "/" + manifest_.vae_file, runners);
    check_compiled_shape(*vae_, "latent_shape", manifest_.latent_shape);
    check_compiled_shape(*vae_, "image_shape", manifest_.image_shape);
  }
}

at::Tensor AOTIPackage::cond(size_t prompt) const {
  if (prompt >= num_prompts())
    throw PackageError("prompt " + std::to_string(prompt) + " outside the package's " + std::to_string(num_prompts()));
  return cond_.narrow(0, static_cast<int64_t>(prompt), 1);
}

at::Tensor AOTIPackage::decode(const at::Tensor& latents) const {
  if (!vae_) throw PackageError("the package in '" + dir_ + "' has no VAE decoder (exported with decoder=False)");
  const int64_t batch = latents.size(0);
  if (batch > manifest_.vae_max_batch)
    throw PackageError("a VAE batch of " + std::to_string(batch) + " is above the package's compiled maximum " +
                       std::to_string(manifest_.vae_max_batch));
  if (batch >= manifest_.vae_min_batch) return vae_->run({latents.contiguous()})[0];
  // torch.export specialises tiny batches away for some modules: pad with copies of the last row.
  at::Tensor padded = at::cat({latents, latents.narrow(0, batch - 1, 1).expand(
                                            {manifest_.vae_min_batch - batch, -1, -1, -1})});
  return vae_->run({padded.contiguous()})[0].narrow(0, 0, batch);
}

void AOTIPackage::check_plan(const StepPlan& plan) const {
  if (plan.prediction_type != manifest_.prediction_type)
    throw PackageError("the plan expects " + plan.prediction_type + " outputs but the package's model predicts " +
                       manifest_.prediction_type);
  if (!plan.schedule_fingerprint.empty() && !manifest_.schedule_fingerprint.empty() &&
      plan.schedule_fingerprint != manifest_.schedule_fingerprint)
    throw PackageError("the plan was made for schedule " + plan.schedule_fingerprint + " but the package's model uses " +
                       manifest_.schedule_fingerprint + " (plan fingerprint does not match the engine)");
}

AOTIDenoiser::AOTIDenoiser(const AOTIPackage& package, at::Tensor cond, at::Tensor uncond)
    : package_(package), cond_(std::move(cond)), uncond_(std::move(uncond)) {}

void AOTIDenoiser::forward(const DenoiserCall& call) {
  const auto& m = package_.manifest();
  std::vector<int64_t> shape{call.n};
  shape.insert(shape.end(), call.sample_shape->begin(), call.sample_shape->end());
  if (std::vector<int64_t>(shape.begin() + 1, shape.end()) != m.latent_shape)
    throw SamplerError("latents of shape " + join(shape) + " for a UNet compiled for [n] + " + join(m.latent_shape));
  if (call.guided && !uncond_.defined())
    throw SamplerError("guided sampling needs unconditional embeddings (the denoiser has none)");
  at::Tensor x = at::from_blob(const_cast<float*>(call.x), shape, at::kFloat);
  at::Tensor t = at::from_blob(const_cast<float*>(call.t), {call.n}, at::kFloat);
  at::Tensor cond = cond_, uncond = uncond_;
  if (call.index != nullptr) {
    at::Tensor idx = at::from_blob(const_cast<int64_t*>(call.index), {call.n}, at::kLong);
    cond = cond.index_select(0, idx);
    if (call.guided) uncond = uncond.index_select(0, idx);
  }
  std::vector<at::Tensor> inputs;
  if (call.guided)
    inputs = {at::cat({x, x}), at::cat({t, t}), at::cat({uncond, cond})};
  else
    inputs = {x, t, cond};
  const int64_t rows = inputs[0].size(0);
  if (rows < m.unet_min_batch || rows > m.unet_max_batch)
    throw SamplerError("a UNet batch of " + std::to_string(rows) + " is outside the package's compiled range " +
                       std::to_string(m.unet_min_batch) + ".." + std::to_string(m.unet_max_batch));
  at::Tensor out = package_.unet().run(inputs)[0].contiguous().to(at::kFloat);
  std::vector<int64_t> want = shape;
  want[0] = rows;
  if (out.sizes().vec() != want)
    throw SamplerError("the UNet returned shape " + join(out.sizes().vec()) + ", expected " + join(want));
  std::memcpy(call.out, out.data_ptr<float>(), static_cast<size_t>(out.numel()) * sizeof(float));
}

}  // namespace fastdiff
