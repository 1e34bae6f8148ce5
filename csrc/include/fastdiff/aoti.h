// AOTInductor engines for the C++ runtime (needs libtorch: built when CMake finds Torch).
//
// An AOTI package directory is written by `fastdiff export --format aoti` (fastdiff.aoti): the
// UNet (and VAE decoder) compiled ahead of time, the plan with its compiled program, pre-encoded
// prompts and package.json, the manifest checked before any compiled code is loaded.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "fastdiff/io.h"
#include "fastdiff/plan.h"
#include "fastdiff/sampler.h"

namespace torch::inductor {
class AOTIModelPackageLoader;
}

namespace fastdiff {

// A package that cannot be used here: unreadable, built by another torch or for another
// device, or inconsistent with the plan. The message names what was expected.
class PackageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// "2.13.0": the libtorch this runtime was built against.
std::string torch_version();

// One compiled module (a .pt2 file). run() may be called from many threads at once: the
// loader's pool of `runners` model instances serves them (a caller waits when all are busy).
class AOTIModule {
 public:
  AOTIModule(const std::string& path, size_t runners);
  ~AOTIModule();
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) const;
  // The metadata compiled into the package (fastdiff.aoti writes fastdiff.<key> entries).
  std::string metadata(const std::string& key) const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

struct PackageManifest {
  std::string model, torch, device, prediction_type, schedule_fingerprint, plan_file, prompts_file, unet_file, vae_file;
  std::map<std::string, std::string> sha256;  // file name -> hex digest, for every file the package loads
  std::vector<int64_t> latent_shape, cond_shape, image_shape;
  int64_t unet_min_batch = 1, unet_max_batch = 1, vae_min_batch = 1, vae_max_batch = 0;
  bool has_vae = false;
  double guidance_scale = 1.0;
  std::vector<std::string> prompts;
};

// Reads and checks DIR/package.json (format, version, torch version, device kind) without
// loading compiled code. Throws PackageError.
PackageManifest read_manifest(const std::string& dir);

// A loaded package: manifest, UNet (and VAE), the plan, the prompt embeddings.
class AOTIPackage {
 public:
  // runners: model instances per module (the concurrency of run()).
  explicit AOTIPackage(const std::string& dir, size_t runners = 1);

  const PackageManifest& manifest() const { return manifest_; }
  const StepPlan& plan() const { return plan_; }
  // The conditioning of prompt p ([1, L, D]) and the unconditional one (undefined without guidance).
  at::Tensor cond(size_t prompt) const;
  const at::Tensor& uncond() const { return uncond_; }
  size_t num_prompts() const { return static_cast<size_t>(cond_.size(0)); }
  const AOTIModule& unet() const { return *unet_; }
  // Latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] (a batch below the package's compiled
  // minimum is padded, then cut). Throws PackageError without a VAE.
  at::Tensor decode(const at::Tensor& latents) const;

  // Throws PackageError unless `plan` was made for this package's schedule and prediction type.
  void check_plan(const StepPlan& plan) const;

 private:
  std::string dir_;
  PackageManifest manifest_;
  StepPlan plan_;
  at::Tensor cond_, uncond_;
  std::unique_ptr<AOTIModule> unet_, vae_;
};

// The package's UNet as a Denoiser for one batch: cond [B, L, D] (one row per sample) and, with
// guidance, uncond [B, L, D]; compacted calls select their rows. Holds no mutable state, so
// one instance may serve concurrent runs.
class AOTIDenoiser : public Denoiser {
 public:
  AOTIDenoiser(const AOTIPackage& package, at::Tensor cond, at::Tensor uncond = {});
  void forward(const DenoiserCall& call) override;

 private:
  const AOTIPackage& package_;
  at::Tensor cond_, uncond_;
};

}  // namespace fastdiff
