#pragma once
/// \file rankwise/io/atomic_file.hpp
/// AtomicFile: every file rankwise writes appears complete or not at all.
///
///   open     a fresh temporary ".<name>.tmp.<pid>.<n>" in the target's own directory (O_EXCL)
///   write    straight to the temporary
///   commit   fsync the temporary, close it, rename it over the target, fsync the directory
///            (durable = false skips both fsyncs: still atomic, not proof against power loss)
///   abandon  (destruction without commit, or any failure) close and unlink the temporary
/// rename() within one directory is atomic on POSIX file systems, so a reader sees either the
/// previous file or the new one, and a crash leaves the previous file intact (at worst a stray
/// temporary remains). ScopedWriteFailure makes writes fail on purpose, to test that promise.
/// Docs: docs/io/atomic-file.md

#include <rankwise/core/error.hpp>
#include <rankwise/io/detail/file.hpp>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

namespace rankwise {

namespace detail {
/// Bytes that atomic writes on this thread may still write before failing; negative: no limit.
inline std::int64_t& write_failure_budget() {
  thread_local std::int64_t budget = -1;
  return budget;
}

inline std::uint64_t next_temporary_id() {
  static std::atomic<std::uint64_t> counter{0};
  return counter.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace detail

/// For tests: while an instance lives, atomic writes on the calling thread fail with IoError, as a
/// full disk would, once `bytes` bytes have been written in total (the bytes before the limit are
/// really written, so the temporary file is half-written when the failure strikes).
class ScopedWriteFailure {
 public:
  explicit ScopedWriteFailure(std::uint64_t bytes) : m_previous(detail::write_failure_budget()) {
    detail::write_failure_budget() = std::int64_t(bytes);
  }
  ScopedWriteFailure(const ScopedWriteFailure&) = delete;
  ScopedWriteFailure& operator=(const ScopedWriteFailure&) = delete;
  ~ScopedWriteFailure() { detail::write_failure_budget() = m_previous; }

 private:
  std::int64_t m_previous;
};

class AtomicFile {
 public:
  /// Creates the temporary next to `target`. The target's directory must exist. `durable = false`
  /// skips the two fsyncs: the replacement stays atomic (a crashed process never leaves a torn
  /// file) but a power loss may lose the new file's contents.
  explicit AtomicFile(std::filesystem::path target, bool durable = true)
      : m_target(std::move(target)), m_durable(durable) {
    if (m_target.filename().empty())
      detail::fail("rankwise::AtomicFile", "target must name a file (got '", m_target.string(), "')");
    const std::filesystem::path directory = m_target.parent_path();
    const std::string stem = "." + m_target.filename().string() + ".tmp." + std::to_string(::getpid()) + ".";
    for (int attempt = 0;; ++attempt) {
      m_temporary = directory / (stem + std::to_string(detail::next_temporary_id()));
      int fd = -1;
      do {
        fd = ::open(m_temporary.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      } while (fd < 0 && errno == EINTR);
      if (fd >= 0) {
        m_fd = detail::FileDescriptor(fd);
        return;
      }
      if (errno != EEXIST || attempt > 1000)
        detail::fail<IoError>("rankwise::AtomicFile", "cannot create a temporary file next to '", m_target.string(),
                              "': ", detail::errno_text(errno));
    }
  }

  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  /// Abandons an uncommitted file: the temporary is removed and the target is left as it was.
  ~AtomicFile() { abandon(); }

  /// Appends bytes to the temporary. On failure the file is abandoned and IoError is thrown.
  void write(const void* data, std::size_t size) {
    if (!m_fd.is_open())
      detail::fail<StateError>("rankwise::AtomicFile", "write() after commit() or a failure ('", m_target.string(),
                               "')");
    std::int64_t& budget = detail::write_failure_budget();
    if (budget >= 0 && std::uint64_t(budget) < size) {
      const std::size_t allowed = std::size_t(budget);
      (void)detail::write_all(m_fd.get(), data, allowed);
      budget = 0;
      abandon();
      detail::fail<IoError>("rankwise::AtomicFile", "writing '", m_target.string(), "' failed after ",
                            m_written + allowed, " bytes: injected failure (ScopedWriteFailure)");
    }
    if (budget >= 0) budget -= std::int64_t(size);
    const int error = detail::write_all(m_fd.get(), data, size);
    if (error != 0) {
      abandon();
      detail::fail<IoError>("rankwise::AtomicFile", "writing '", m_target.string(), "' failed after ", m_written,
                            " bytes: ", detail::errno_text(error));
    }
    m_written += size;
  }

  void write(std::span<const unsigned char> bytes) { write(bytes.data(), bytes.size()); }
  void write(std::string_view text) { write(text.data(), text.size()); }

  /// Makes the written bytes durable and puts them in place of the target, atomically.
  void commit() {
    if (!m_fd.is_open())
      detail::fail<StateError>("rankwise::AtomicFile", "commit() twice or after a failure ('", m_target.string(),
                               "')");
    int error = m_durable ? detail::sync_fd(m_fd.get()) : 0;
    if (error == 0 && m_fd.close_checked() != 0) error = errno;
    if (error != 0) {
      abandon();
      detail::fail<IoError>("rankwise::AtomicFile", "cannot flush '", m_temporary.string(),
                            "' to disk: ", detail::errno_text(error));
    }
    if (::rename(m_temporary.c_str(), m_target.c_str()) != 0) {
      error = errno;
      abandon();
      detail::fail<IoError>("rankwise::AtomicFile", "cannot rename '", m_temporary.string(), "' to '",
                            m_target.string(), "': ", detail::errno_text(error));
    }
    m_committed = true;
    if (m_durable) detail::sync_directory(m_target.parent_path(), "rankwise::AtomicFile");
  }

  const std::filesystem::path& target() const { return m_target; }
  const std::filesystem::path& temporary() const { return m_temporary; }
  std::uint64_t bytes_written() const { return m_written; }

 private:
  void abandon() noexcept {
    if (m_committed || m_temporary.empty()) return;
    m_fd.reset();
    std::error_code ignored;
    std::filesystem::remove(m_temporary, ignored);
    m_temporary.clear();
  }

  std::filesystem::path m_target;
  std::filesystem::path m_temporary;
  detail::FileDescriptor m_fd;
  std::uint64_t m_written = 0;
  bool m_durable = true;
  bool m_committed = false;
};

/// Replaces `target` with `bytes`, atomically (durable: see AtomicFile).
inline void write_file_atomically(const std::filesystem::path& target, std::span<const unsigned char> bytes,
                                  bool durable = true) {
  AtomicFile file(target, durable);
  file.write(bytes);
  file.commit();
}

inline void write_file_atomically(const std::filesystem::path& target, std::string_view text, bool durable = true) {
  AtomicFile file(target, durable);
  file.write(text);
  file.commit();
}

}  // namespace rankwise
