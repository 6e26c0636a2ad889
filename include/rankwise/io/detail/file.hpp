#pragma once
/// \file rankwise/io/detail/file.hpp
/// The few operating-system calls rankwise's I/O needs (POSIX): a read-only file with positioned
/// reads, and the primitives of atomic writing (exclusive create, write all, fsync, rename).
/// Every failure throws IoError naming the path and the system's reason. Docs: docs/io/atomic-file.md

#include <rankwise/core/error.hpp>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#else
#error "rankwise/io needs a POSIX system (open, pread, fsync, rename)"
#endif

namespace rankwise::detail {

inline std::string errno_text(int error) { return std::strerror(error); }

/// An owned file descriptor, closed on destruction.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : m_fd(fd) {}
  FileDescriptor(FileDescriptor&& other) noexcept : m_fd(std::exchange(other.m_fd, -1)) {}
  FileDescriptor& operator=(FileDescriptor&& other) noexcept {
    if (this != &other) {
      reset();
      m_fd = std::exchange(other.m_fd, -1);
    }
    return *this;
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() { reset(); }

  int get() const { return m_fd; }
  bool is_open() const { return m_fd >= 0; }
  void reset() {
    if (m_fd >= 0) ::close(m_fd);
    m_fd = -1;
  }
  /// Closes and reports the error close() may return (a delayed write error on some systems).
  int close_checked() {
    const int fd = std::exchange(m_fd, -1);
    return fd >= 0 ? ::close(fd) : 0;
  }

 private:
  int m_fd = -1;
};

/// A file opened for reading, with its size at open time and positioned reads.
class ReadOnlyFile {
 public:
  ReadOnlyFile() = default;
  ReadOnlyFile(const std::filesystem::path& path, const char* where) : m_path(path.string()) {
    int fd = -1;
    do {
      fd = ::open(m_path.c_str(), O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) fail<IoError>(where, "cannot open '", m_path, "' for reading: ", errno_text(errno));
    m_fd = FileDescriptor(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0) fail<IoError>(where, "cannot stat '", m_path, "': ", errno_text(errno));
    if (!S_ISREG(st.st_mode)) fail<IoError>(where, "'", m_path, "' is not a regular file");
    m_size = std::uint64_t(st.st_size);
  }

  std::uint64_t size() const { return m_size; }
  const std::string& path() const { return m_path; }

  /// Reads exactly `size` bytes at `offset`; false if the file ended first (it shrank since open).
  bool read_at(std::uint64_t offset, void* out, std::size_t size, const char* where) const {
    auto* dst = static_cast<unsigned char*>(out);
    while (size > 0) {
      const std::size_t chunk = size < (std::size_t(1) << 30) ? size : (std::size_t(1) << 30);
      const ::ssize_t got = ::pread(m_fd.get(), dst, chunk, ::off_t(offset));
      if (got < 0) {
        if (errno == EINTR) continue;
        fail<IoError>(where, "cannot read '", m_path, "' at byte ", offset, ": ", errno_text(errno));
      }
      if (got == 0) return false;
      dst += got;
      offset += std::uint64_t(got);
      size -= std::size_t(got);
    }
    return true;
  }

  /// Reads `rows` consecutive rows of `row_bytes` bytes at `offset`, row i to dst + i * dst_stride
  /// (one preadv per up to 256 rows); false if the file ended first.
  bool read_rows_at(std::uint64_t offset, std::size_t rows, std::size_t row_bytes, unsigned char* dst,
                    std::size_t dst_stride, const char* where) const {
    constexpr std::size_t batch = 256;
    std::vector<::iovec> iov;
    for (std::size_t done = 0; done < rows;) {
      const std::size_t n = rows - done < batch ? rows - done : batch;
      iov.resize(n);
      for (std::size_t i = 0; i < n; ++i) iov[i] = {dst + (done + i) * dst_stride, row_bytes};
      std::size_t first = 0;
      std::uint64_t at = offset + std::uint64_t(done) * row_bytes;
      while (first < n) {
        const ::ssize_t got = ::preadv(m_fd.get(), iov.data() + first, int(n - first), ::off_t(at));
        if (got < 0) {
          if (errno == EINTR) continue;
          fail<IoError>(where, "cannot read '", m_path, "' at byte ", at, ": ", errno_text(errno));
        }
        if (got == 0) return false;
        at += std::uint64_t(got);
        std::size_t left = std::size_t(got);
        while (first < n && left >= iov[first].iov_len) left -= iov[first++].iov_len;
        if (left > 0) {
          iov[first].iov_base = static_cast<unsigned char*>(iov[first].iov_base) + left;
          iov[first].iov_len -= left;
        }
      }
      done += n;
    }
    return true;
  }

 private:
  std::string m_path;
  FileDescriptor m_fd;
  std::uint64_t m_size = 0;
};

/// Writes all `size` bytes (retrying short writes and EINTR); returns 0 or the errno of the failure.
inline int write_all(int fd, const void* data, std::size_t size) {
  const auto* src = static_cast<const unsigned char*>(data);
  while (size > 0) {
    const std::size_t chunk = size < (std::size_t(1) << 30) ? size : (std::size_t(1) << 30);
    const ::ssize_t put = ::write(fd, src, chunk);
    if (put < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    src += put;
    size -= std::size_t(put);
  }
  return 0;
}

/// fsync that retries EINTR; returns 0 or errno.
inline int sync_fd(int fd) {
  int rc = 0;
  do {
    rc = ::fsync(fd);
  } while (rc != 0 && errno == EINTR);
  return rc == 0 ? 0 : errno;
}

/// Makes a rename inside `directory` durable. File systems that cannot sync a directory (EINVAL)
/// are accepted: the rename itself is still atomic there.
inline void sync_directory(const std::filesystem::path& directory, const char* where) {
  const std::string dir = directory.empty() ? std::string(".") : directory.string();
  int fd = -1;
  do {
    fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) fail<IoError>(where, "cannot open directory '", dir, "' to sync it: ", errno_text(errno));
  FileDescriptor guard(fd);
  const int error = sync_fd(fd);
  if (error != 0 && error != EINVAL && error != EROFS)
    fail<IoError>(where, "cannot sync directory '", dir, "': ", errno_text(error));
}

}  // namespace rankwise::detail
