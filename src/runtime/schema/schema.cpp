// hotpipe's TorchScript schema reader.
//
// tch 0.24 can call a module's methods but not say what they take. The inference runtime
// needs the names and types of `forward`'s arguments to hand each item's parameters to
// the model (see src/runtime/schema/mod.rs). The module is loaded here on the CPU, its
// schema printed, and the module freed. Every exception is caught; nothing is thrown
// across the C boundary.
#include <torch/script.h>

#include <string>

namespace {
thread_local std::string result;
}

extern "C" {

// The arguments of `forward` of the TorchScript file `path`, after `self`, one per line:
// "name<TAB>type<TAB>0|1" (1: the argument has a default). Returns 0 and sets *out to the
// text, or 1 and sets *out to the error; the text lives until the next call on this
// thread.
int hp_forward_schema(const char* path, const char** out) {
  try {
    auto module = torch::jit::load(path, c10::Device(c10::kCPU));
    const auto& schema = module.get_method("forward").function().getSchema();
    std::string text;
    bool first = true;
    for (const auto& a : schema.arguments()) {
      if (first) {  // self
        first = false;
        continue;
      }
      text += a.name();
      text += '\t';
      text += a.type()->annotation_str();
      text += '\t';
      text += a.default_value().has_value() ? '1' : '0';
      text += '\n';
    }
    result = text;
    *out = result.c_str();
    return 0;
  } catch (const std::exception& e) {
    result = e.what();
  } catch (...) {
    result = "unknown C++ exception";
  }
  *out = result.c_str();
  return 1;
}
}
