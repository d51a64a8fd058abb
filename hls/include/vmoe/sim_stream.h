// Minimal stand-ins for hls::stream and hls::vector, used only when not compiling under Vitis HLS
// (g++ C-simulation). Under Vitis the tool's own <hls_stream.h> / <hls_vector.h> are used.
#ifndef VMOE_SIM_STREAM_H
#define VMOE_SIM_STREAM_H

#if defined(__VITIS_HLS__) || defined(__SYNTHESIS__)
#include <hls_stream.h>
#include <hls_vector.h>
#else
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <deque>

namespace hls {

template <class T>
class stream {
  public:
    stream() {}
    explicit stream(const char *) {}
    void write(const T &v) { q_.push_back(v); }
    T read() {
        if (q_.empty()) {
            std::fprintf(stderr, "hls::stream stand-in: read from an empty stream\n");
            std::abort();
        }
        T v = q_.front();
        q_.pop_front();
        return v;
    }
    void operator<<(const T &v) { write(v); }
    void operator>>(T &v) { v = read(); }
    bool empty() const { return q_.empty(); }
    bool full() const { return false; }
    std::size_t size() const { return q_.size(); }

  private:
    std::deque<T> q_;
};

template <class T, std::size_t N>
struct vector {
    T data[N];
    T &operator[](std::size_t i) { return data[i]; }
    const T &operator[](std::size_t i) const { return data[i]; }
    static constexpr std::size_t size() { return N; }
};

}  // namespace hls
#endif
#endif
