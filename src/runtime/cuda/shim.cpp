// hotpipe's CUDA stream/event shim.
//
// tch 0.24 exposes pinned memory and non-blocking copies but no streams or events. This
// file adds exactly what the inference worker needs, using only libtorch's
// device-generic c10 API (DeviceGuardImplInterface, c10::Stream, c10::Event,
// c10::StreamGuard, the DeviceAllocator), so it compiles against the PyPI wheel's headers
// without the CUDA toolkit. Every entry point catches all exceptions and returns an error
// code; the message is kept per thread for hp_last_error(). Nothing is thrown across the C
// boundary.
#include <ATen/core/Tensor.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstring>
#include <string>

// OpenMP, which libtorch's CPU kernels run on. Weak: resolved at run time from the
// libgomp that libtorch_cpu loads, null if libtorch was built without OpenMP.
extern "C" void omp_set_num_threads(int) __attribute__((weak));
extern "C" int omp_get_max_threads() __attribute__((weak));
// MKL (libtorch's sgemm for linear layers) keeps its own per-thread count, which libtorch
// sets to its process-wide default when a thread first uses it. The C entry point: the
// lower-case name is the Fortran one, which takes a pointer.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
extern "C" int MKL_Get_Max_Threads() __attribute__((weak));

namespace {
thread_local std::string last_error;

int fail(const char* what) {
  last_error = what;
  return 1;
}

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what());
  } catch (...) {
    return fail("unknown C++ exception");
  }
}

const c10::impl::DeviceGuardImplInterface* cuda_impl() {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
}
}  // namespace

extern "C" {

const char* hp_last_error() { return last_error.c_str(); }

int hp_stream_from_pool(int device, int high_priority, void** out) {
  return guarded([&] {
    c10::Device d(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    c10::Stream s = cuda_impl()->getStreamFromGlobalPool(d, high_priority != 0);
    *out = new c10::Stream(s);
  });
}

void hp_stream_free(void* s) { delete static_cast<c10::Stream*>(s); }

int hp_stream_synchronize(void* s) {
  return guarded([&] { static_cast<c10::Stream*>(s)->synchronize(); });
}

int hp_stream_guard_enter(void* s, void** out) {
  return guarded([&] { *out = new c10::StreamGuard(*static_cast<c10::Stream*>(s)); });
}

void hp_stream_guard_exit(void* g) { delete static_cast<c10::StreamGuard*>(g); }

int hp_event_new(void** out) {
  return guarded([&] { *out = new c10::Event(c10::DeviceType::CUDA); });
}

void hp_event_free(void* e) { delete static_cast<c10::Event*>(e); }

int hp_event_record(void* e, void* s) {
  return guarded([&] { static_cast<c10::Event*>(e)->record(*static_cast<c10::Stream*>(s)); });
}

int hp_event_block(void* e, void* s) {
  return guarded([&] { static_cast<c10::Event*>(e)->block(*static_cast<c10::Stream*>(s)); });
}

int hp_event_synchronize(void* e) {
  return guarded([&] { static_cast<c10::Event*>(e)->synchronize(); });
}

int hp_event_query(void* e, int* done) {
  return guarded([&] { *done = static_cast<c10::Event*>(e)->query() ? 1 : 0; });
}

// dst.copy_(src, non_blocking) on the current stream (set a StreamGuard first).
int hp_copy_(void* dst, void* src, int non_blocking) {
  return guarded([&] {
    static_cast<at::Tensor*>(dst)->copy_(*static_cast<at::Tensor*>(src), non_blocking != 0);
  });
}

// Tell the caching allocator `t` is in use on `s`, so its memory is not handed out again
// until the work queued on `s` so far has finished.
int hp_record_stream(void* t, void* s) {
  return guarded([&] { static_cast<at::Tensor*>(t)->record_stream(*static_cast<c10::Stream*>(s)); });
}

int hp_mem_info(int device, size_t* free_bytes, size_t* total_bytes) {
  return guarded([&] {
    c10::DeviceGuard g(c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device)));
    auto info = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getMemoryInfo(static_cast<c10::DeviceIndex>(device));
    *free_bytes = info.first;
    *total_bytes = info.second;
  });
}

// Peak bytes allocated by the caching allocator on `device` since the last reset.
int hp_peak_allocated(int device, int reset, size_t* peak) {
  return guarded([&] {
    auto* a = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto idx = static_cast<c10::DeviceIndex>(device);
    if (reset) {
      a->resetPeakStats(idx);
    }
    auto stats = a->getDeviceStats(idx);
    *peak = static_cast<size_t>(
        stats.allocated_bytes[static_cast<size_t>(c10::CachingDeviceAllocator::StatType::AGGREGATE)].peak);
  });
}

// Wait until all work queued on `device`, on every stream, has finished.
int hp_device_synchronize(int device) {
  return guarded([&] { cuda_impl()->synchronizeDevice(static_cast<c10::DeviceIndex>(device)); });
}

int hp_empty_cache() {
  return guarded([&] { c10::getDeviceAllocator(c10::DeviceType::CUDA)->emptyCache(); });
}

// Intra-op threads for the calling thread only. at::set_num_threads also sets the
// process-wide default every thread adopts on its first parallel operation; this sets the
// calling thread's OpenMP count (convolutions, pooling, element-wise kernels) and, where
// libtorch has MKL, MKL's count for the calling thread (matrix products), and nothing
// else. The caller must have run a parallel operation (or at::get_num_threads) in this
// thread first, or that first operation replaces this setting with the process-wide
// default. Returns the OpenMP count now in effect, or -1 without OpenMP.
int hp_set_local_threads(int n) {
  if (omp_set_num_threads == nullptr || omp_get_max_threads == nullptr) return -1;
  omp_set_num_threads(n);
  if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(n);
  return omp_get_max_threads();
}

// The calling thread's OpenMP and MKL thread counts (-1 where absent).
void hp_local_threads(int* omp, int* mkl) {
  *omp = omp_get_max_threads != nullptr ? omp_get_max_threads() : -1;
  *mkl = MKL_Get_Max_Threads != nullptr ? MKL_Get_Max_Threads() : -1;
}
}
