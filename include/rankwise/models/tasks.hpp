#pragma once
/// \file rankwise/models/tasks.hpp
/// Synthetic sequence tasks for the toy transformer, generated from a seeded Random (nothing is
/// downloaded): a pre-training mixture and downstream tasks the base model has not seen.
///
///   sequence  [task] input... [SEP] answer... [EOS] [PAD]...      (length seq_len)
///   targets   targets[t] = tokens[t + 1] where that token is scored, else ignore_index (-100)
///   scored    the answer and its EOS (every task); grammar scores the whole string (language modelling)
///
///   pre-training (Mixture): copy, reverse, grammar (two kinds of brackets, balanced, from a random
///                           context-free grammar)
///   downstream: sort (letters in ascending order), add (two numbers, answer digits least significant
///               first, as small transformers learn addition far more easily in that order),
///               relabel (copy through a fixed random permutation of the letters)
/// Exact match: a sequence counts as right when the argmax at every scored position equals its
/// target. Under teacher forcing this equals greedy decoding's exact match: if every step's argmax is
/// right, greedy decoding reproduces the answer, and conversely. Docs: docs/models/toy-transformer.md

#include <rankwise/core/error.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/layers/cross_entropy.hpp>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string>
#include <string_view>
#include <vector>

namespace rankwise {

enum class TaskKind { Copy, Reverse, Grammar, Mixture, Sort, Add, Relabel };

/// Parses "copy", "reverse", "grammar", "mixture", "sort", "add", "relabel".
inline TaskKind task_kind_from_name(std::string_view name) {
  if (name == "copy") return TaskKind::Copy;
  if (name == "reverse") return TaskKind::Reverse;
  if (name == "grammar") return TaskKind::Grammar;
  if (name == "mixture") return TaskKind::Mixture;
  if (name == "sort") return TaskKind::Sort;
  if (name == "add") return TaskKind::Add;
  if (name == "relabel") return TaskKind::Relabel;
  detail::fail("rankwise::Tasks", "task must be one of copy, reverse, grammar, mixture, sort, add, relabel (got \"",
               name, "\")");
}

inline const char* to_string(TaskKind kind) {
  switch (kind) {
    case TaskKind::Copy: return "copy";
    case TaskKind::Reverse: return "reverse";
    case TaskKind::Grammar: return "grammar";
    case TaskKind::Mixture: return "mixture";
    case TaskKind::Sort: return "sort";
    case TaskKind::Add: return "add";
    case TaskKind::Relabel: return "relabel";
  }
  return "unknown";
}

/// The token layout shared by every task.
struct Vocabulary {
  static constexpr std::int32_t pad = 0, sep = 1, eos = 2, plus = 3;
  static constexpr std::int32_t first_task = 4;    ///< task tokens 4..10, one per TaskKind
  static constexpr std::int32_t first_digit = 12;  ///< '0'..'9' = 12..21
  static constexpr std::int32_t first_bracket = 22;  ///< ( ) [ ] = 22..25
  static constexpr std::int32_t first_letter = 32;
  static std::int32_t task_token(TaskKind kind) { return first_task + std::int32_t(kind); }
  static std::int32_t digit(int d) { return first_digit + d; }
};

struct TaskOptions {
  Index vocab = 128;
  Index seq_len = 32;
  Index letters = 16;        ///< alphabet of copy/reverse/sort/relabel: tokens 32 .. 32 + letters - 1
  Index min_length = 2;      ///< input length range of the letter tasks
  Index max_length = 8;
  Index max_digits = 4;      ///< operands of add have 1..max_digits digits
  std::uint64_t relabel_seed = 17;  ///< the permutation of the relabel task
};

/// A batch: `batch` sequences of `seq_len` tokens, concatenated, with their next-token targets.
struct TokenBatch {
  Index batch = 0;
  Index seq_len = 0;
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> targets;
};

class TaskGenerator {
 public:
  explicit TaskGenerator(TaskKind kind, const TaskOptions& options = {}) : m_kind(kind), m_options(options) {
    const TaskOptions& o = options;
    if (o.letters < 2 || Vocabulary::first_letter + o.letters > o.vocab)
      detail::fail("rankwise::TaskGenerator", "letters must be in [2, vocab - 32] = [2, ", o.vocab - 32, "] (got ",
                   o.letters, ")");
    if (o.min_length < 1 || o.max_length < o.min_length)
      detail::fail("rankwise::TaskGenerator", "need 1 <= min_length <= max_length (got ", o.min_length, ", ",
                   o.max_length, ")");
    if (o.max_digits < 1) detail::fail("rankwise::TaskGenerator", "max_digits must be >= 1 (got ", o.max_digits, ")");
    const Index needed = std::max(2 * o.max_length + 3, 2 * o.max_digits + 1 + (o.max_digits + 1) + 3);
    if (o.seq_len < needed)
      detail::fail("rankwise::TaskGenerator", "seq_len must be >= ", needed,
                   " to hold the longest example of these options (got ", o.seq_len, ")");
    m_permutation.resize(std::size_t(o.letters));
    std::iota(m_permutation.begin(), m_permutation.end(), 0);
    Random perm_rng(o.relabel_seed);
    for (std::size_t i = m_permutation.size() - 1; i > 0; --i)  // Fisher-Yates
      std::swap(m_permutation[i], m_permutation[std::size_t(perm_rng.uniform_int(0, Index(i)))]);
  }

  TaskKind kind() const { return m_kind; }
  const TaskOptions& options() const { return m_options; }

  /// `batch` fresh sequences drawn from rng.
  TokenBatch sample(Index batch, Random& rng) const {
    if (batch < 1) detail::fail("rankwise::TaskGenerator", "batch must be >= 1 (got ", batch, ")");
    TokenBatch out;
    out.batch = batch;
    out.seq_len = m_options.seq_len;
    out.tokens.reserve(std::size_t(batch * m_options.seq_len));
    out.targets.reserve(std::size_t(batch * m_options.seq_len));
    std::vector<std::int32_t> seq;
    std::vector<char> scored;
    for (Index b = 0; b < batch; ++b) {
      TaskKind kind = m_kind;
      if (kind == TaskKind::Mixture) kind = TaskKind(rng.uniform_int(0, 2));  // copy, reverse, grammar
      make_sequence(kind, rng, seq, scored);
      append(seq, scored, out);
    }
    return out;
  }

  /// The answer the task expects for a letter/number input (used by tests and demos).
  std::vector<std::int32_t> answer(TaskKind kind, const std::vector<std::int32_t>& input) const {
    std::vector<std::int32_t> out = input;
    switch (kind) {
      case TaskKind::Copy: break;
      case TaskKind::Reverse: std::reverse(out.begin(), out.end()); break;
      case TaskKind::Sort: std::sort(out.begin(), out.end()); break;
      case TaskKind::Relabel:
        for (std::int32_t& t : out) t = Vocabulary::first_letter + m_permutation[std::size_t(t - Vocabulary::first_letter)];
        break;
      case TaskKind::Add: {
        const auto plus = std::find(input.begin(), input.end(), Vocabulary::plus);
        const auto value = [](auto first, auto last) {
          long v = 0;
          for (auto it = first; it != last; ++it) v = v * 10 + (*it - Vocabulary::first_digit);
          return v;
        };
        long sum = value(input.begin(), plus) + value(plus + 1, input.end());
        out.clear();
        do {  // least significant digit first
          out.push_back(Vocabulary::digit(int(sum % 10)));
          sum /= 10;
        } while (sum > 0);
        break;
      }
      default: detail::fail("rankwise::TaskGenerator", "answer: task ", to_string(kind), " has no single answer");
    }
    return out;
  }

 private:
  void make_sequence(TaskKind kind, Random& rng, std::vector<std::int32_t>& seq, std::vector<char>& scored) const {
    seq.clear();
    scored.clear();
    const auto push = [&](std::int32_t token, bool score) {
      seq.push_back(token);
      scored.push_back(score ? 1 : 0);
    };
    push(Vocabulary::task_token(kind), false);
    if (kind == TaskKind::Grammar) {
      // A balanced string of two kinds of brackets (the language of S -> S S | ( S ) | [ S ] | empty)
      // of even length L drawn uniformly: open while there is room, close when the rest must close.
      const Index room = (m_options.seq_len - 2) / 2;
      const Index length = 2 * rng.uniform_int(1, room);
      std::vector<std::int32_t> closers;
      for (Index i = 0; i < length; ++i) {
        const Index remaining = length - i;
        const bool must_close = Index(closers.size()) == remaining;
        const bool must_open = closers.empty();
        if (must_close || (!must_open && rng.bernoulli(0.5))) {
          push(closers.back(), true);
          closers.pop_back();
        } else {
          const std::int32_t kind_offset = rng.bernoulli(0.5) ? 0 : 2;
          push(Vocabulary::first_bracket + kind_offset, true);
          closers.push_back(Vocabulary::first_bracket + kind_offset + 1);
        }
      }
      push(Vocabulary::eos, true);
      return;
    }
    std::vector<std::int32_t> input;
    if (kind == TaskKind::Add) {
      for (int operand = 0; operand < 2; ++operand) {
        if (operand == 1) input.push_back(Vocabulary::plus);
        const Index digits = rng.uniform_int(1, m_options.max_digits);
        for (Index i = 0; i < digits; ++i)
          input.push_back(Vocabulary::digit(int(rng.uniform_int(i == 0 && digits > 1 ? 1 : 0, 9))));
      }
    } else {
      const Index length = rng.uniform_int(m_options.min_length, m_options.max_length);
      for (Index i = 0; i < length; ++i)
        input.push_back(Vocabulary::first_letter + std::int32_t(rng.uniform_int(0, m_options.letters - 1)));
    }
    for (std::int32_t t : input) push(t, false);
    push(Vocabulary::sep, false);
    for (std::int32_t t : answer(kind, input)) push(t, true);
    push(Vocabulary::eos, true);
  }

  void append(const std::vector<std::int32_t>& seq, const std::vector<char>& scored, TokenBatch& out) const {
    const Index T = m_options.seq_len;
    for (Index t = 0; t < T; ++t) {
      out.tokens.push_back(t < Index(seq.size()) ? seq[std::size_t(t)] : Vocabulary::pad);
      const bool next_scored = t + 1 < Index(seq.size()) && scored[std::size_t(t + 1)];
      out.targets.push_back(next_scored ? seq[std::size_t(t + 1)] : ignore_index);
    }
  }

  TaskKind m_kind;
  TaskOptions m_options;
  std::vector<std::int32_t> m_permutation;
};

/// Fraction of sequences whose every scored position has argmax(logits) == target.
/// logits: vocab x (batch * seq_len), columns in the batch's order.
template <FloatScalar Scalar>
double exact_match(const TokenBatch& batch, const ConstRef<Scalar>& logits) {
  if (logits.cols() != batch.batch * batch.seq_len)
    detail::fail("rankwise::exact_match", "logits must have batch * seq_len = ", batch.batch * batch.seq_len,
                 " columns (got ", logits.cols(), ")");
  Index right = 0;
  for (Index b = 0; b < batch.batch; ++b) {
    bool ok = true;
    for (Index t = 0; t < batch.seq_len && ok; ++t) {
      const Index c = b * batch.seq_len + t;
      const std::int32_t target = batch.targets[std::size_t(c)];
      if (target == ignore_index) continue;
      Index best = 0;
      logits.col(c).maxCoeff(&best);
      ok = best == target;
    }
    right += ok;
  }
  return double(right) / double(batch.batch);
}

}  // namespace rankwise
