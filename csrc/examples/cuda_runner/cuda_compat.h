// The CUDA runner example's one place for what depends on the CUDA version: the minimum it needs,
// and the calls whose signature changed between CUDA 12 and 13. Plain C++ (cuda_runtime_api.h
// only). csrc/tools/check_cuda_headers.sh compiles the host side against the 12.3 and 12.4 runtime
// headers and the CUDA 13 ones, and confirms that the 12.2 headers stop at the #error below.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

// CUDA 12.3 is the first release with conditional graph nodes: cudaGraphConditionalHandleCreate,
// cudaConditionalNodeParams (IF and WHILE), the device-side cudaGraphSetConditional, and
// cudaStreamBeginCaptureToGraph, which captures a model call into an IF node's body; the 12.2
// headers have none of them (cudaGraphNodeParams and cudaGraphAddNode arrived in 12.2). The
// driver must be as new: NVIDIA's graphConditionalNodes sample (cuda-samples) skips IF/WHILE
// nodes below driver 12030. Nothing newer is used: IF/ELSE (size 2) and SWITCH nodes (12.8) are
// not. Keep in step with FASTDIFF_CUDA_MIN_VERSION in CMakeLists.txt and CUDA_RUNNER_MIN in
// python/fastdiff/info.py (tests/test_build.py holds them together).
#define FASTDIFF_CUDA_MIN_VERSION 12030
#if CUDART_VERSION < FASTDIFF_CUDA_MIN_VERSION
#error "the CUDA runner example needs CUDA >= 12.3 (conditional graph nodes, cudaStreamBeginCaptureToGraph)"
#endif

namespace fastdiff {
namespace cuda {
namespace compat {

// CUDA 13 gave these three calls an edge-data parameter under their plain names (12.3 has those
// forms only as cudaStreamGetCaptureInfo_v3, cudaGraphAddNode_v2 and
// cudaStreamUpdateCaptureDependencies_v2; 13 has no suffixed names), so no one spelling compiles
// with both. The runner passes no edge data, which both read as default edges.

// The graph `stream` is capturing into and the nodes the next captured work will depend on
// (any output may be null).
inline cudaError_t capture_info(cudaStream_t stream, cudaStreamCaptureStatus* status, cudaGraph_t* graph,
                                const cudaGraphNode_t** deps, size_t* num_deps) {
#if CUDART_VERSION >= 13000
  return cudaStreamGetCaptureInfo(stream, status, nullptr, graph, deps, nullptr, num_deps);
#else
  return cudaStreamGetCaptureInfo(stream, status, nullptr, graph, deps, num_deps);
#endif
}

inline cudaError_t add_node(cudaGraphNode_t* node, cudaGraph_t graph, const cudaGraphNode_t* deps, size_t num_deps,
                            cudaGraphNodeParams* params) {
#if CUDART_VERSION >= 13000
  return cudaGraphAddNode(node, graph, deps, nullptr, num_deps, params);
#else
  return cudaGraphAddNode(node, graph, deps, num_deps, params);
#endif
}

// Makes `nodes` the only dependencies of the next work captured on `stream`.
inline cudaError_t set_capture_dependencies(cudaStream_t stream, cudaGraphNode_t* nodes, size_t count) {
#if CUDART_VERSION >= 13000
  return cudaStreamUpdateCaptureDependencies(stream, nodes, nullptr, count, cudaStreamSetCaptureDependencies);
#else
  return cudaStreamUpdateCaptureDependencies(stream, nodes, count, cudaStreamSetCaptureDependencies);
#endif
}

}  // namespace compat
}  // namespace cuda
}  // namespace fastdiff
