// Tests for rankwise/models/tasks.hpp.
#include <rankwise/models/tasks.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <set>
#include <vector>

using rankwise::Index;
using rankwise::Matrix;
using rankwise::Random;
using rankwise::TaskGenerator;
using rankwise::TaskKind;
using V = rankwise::Vocabulary;

namespace {
std::int32_t letter(int i) { return V::first_letter + i; }
}  // namespace

TEST_CASE("Tasks: answers are right on hand-made inputs", "[models][tasks]") {
  TaskGenerator gen(TaskKind::Sort);
  const std::vector<std::int32_t> input = {letter(3), letter(0), letter(2), letter(0)};
  CHECK(gen.answer(TaskKind::Copy, input) == input);
  CHECK(gen.answer(TaskKind::Reverse, input) == std::vector<std::int32_t>{letter(0), letter(2), letter(0), letter(3)});
  CHECK(gen.answer(TaskKind::Sort, input) == std::vector<std::int32_t>{letter(0), letter(0), letter(2), letter(3)});
  // 57 + 68 = 125, written least significant digit first.
  const std::vector<std::int32_t> sum = {V::digit(5), V::digit(7), V::plus, V::digit(6), V::digit(8)};
  CHECK(gen.answer(TaskKind::Add, sum) == std::vector<std::int32_t>{V::digit(5), V::digit(2), V::digit(1)});
  const std::vector<std::int32_t> zero = {V::digit(0), V::plus, V::digit(0)};
  CHECK(gen.answer(TaskKind::Add, zero) == std::vector<std::int32_t>{V::digit(0)});
  // Relabel is a fixed permutation of the alphabet.
  std::vector<std::int32_t> alphabet;
  for (int i = 0; i < 16; ++i) alphabet.push_back(letter(i));
  std::vector<std::int32_t> image = gen.answer(TaskKind::Relabel, alphabet);
  CHECK(image != alphabet);
  std::sort(image.begin(), image.end());
  CHECK(image == alphabet);
}

TEST_CASE("Tasks: sequences have the documented layout and targets", "[models][tasks]") {
  for (TaskKind kind : {TaskKind::Copy, TaskKind::Reverse, TaskKind::Sort, TaskKind::Add, TaskKind::Relabel}) {
    TaskGenerator gen(kind);
    Random rng(3);
    const rankwise::TokenBatch batch = gen.sample(20, rng);
    REQUIRE(batch.tokens.size() == std::size_t(20 * 32));
    for (Index b = 0; b < 20; ++b) {
      const auto first = batch.tokens.begin() + b * 32;
      CHECK(*first == V::task_token(kind));
      const auto sep = std::find(first, first + 32, V::sep);
      REQUIRE(sep != first + 32);
      const auto eos = std::find(sep, first + 32, V::eos);
      REQUIRE(eos != first + 32);
      const std::vector<std::int32_t> input(first + 1, sep), answer(sep + 1, eos);
      CHECK(gen.answer(kind, input) == answer);
      for (Index t = 0; t < 32; ++t) {
        const std::size_t c = std::size_t(b * 32 + t);
        const bool in_answer = first + t >= sep && first + t < eos;  // predicts answer tokens and EOS
        if (in_answer)
          CHECK(batch.targets[c] == batch.tokens[c + 1]);
        else
          CHECK(batch.targets[c] == rankwise::ignore_index);
      }
    }
  }
}

TEST_CASE("Tasks: grammar strings are balanced and the mixture mixes", "[models][tasks]") {
  TaskGenerator grammar(TaskKind::Grammar);
  Random rng(4);
  const rankwise::TokenBatch batch = grammar.sample(50, rng);
  for (Index b = 0; b < 50; ++b) {
    std::vector<std::int32_t> stack;
    Index t = 1;
    for (; batch.tokens[std::size_t(b * 32 + t)] != V::eos; ++t) {
      const std::int32_t tok = batch.tokens[std::size_t(b * 32 + t)];
      if (tok == V::first_bracket || tok == V::first_bracket + 2) {
        stack.push_back(tok + 1);
      } else {
        REQUIRE_FALSE(stack.empty());
        CHECK(stack.back() == tok);
        stack.pop_back();
      }
    }
    CHECK(stack.empty());
  }
  TaskGenerator mixture(TaskKind::Mixture);
  const rankwise::TokenBatch mixed = mixture.sample(60, rng);
  std::set<std::int32_t> kinds;
  for (Index b = 0; b < 60; ++b) kinds.insert(mixed.tokens[std::size_t(b * 32)]);
  CHECK(kinds == std::set<std::int32_t>{V::task_token(TaskKind::Copy), V::task_token(TaskKind::Reverse),
                                         V::task_token(TaskKind::Grammar)});
}

TEST_CASE("Tasks: generation is deterministic under a seed", "[models][tasks][determinism]") {
  TaskGenerator gen(TaskKind::Mixture);
  Random a(9), b(9), c(10);
  const auto x = gen.sample(8, a), y = gen.sample(8, b), z = gen.sample(8, c);
  CHECK(x.tokens == y.tokens);
  CHECK(x.targets == y.targets);
  CHECK(x.tokens != z.tokens);
}

TEST_CASE("exact_match: a sequence counts only when every scored position is right", "[models][tasks]") {
  rankwise::TokenBatch batch;
  batch.batch = 2;
  batch.seq_len = 3;
  batch.tokens = {0, 0, 0, 0, 0, 0};
  batch.targets = {rankwise::ignore_index, 1, 2, 0, rankwise::ignore_index, 3};
  Matrix<float> logits = Matrix<float>::Zero(4, 6);
  logits(0, 0) = 5;  // ignored position: anything goes
  logits(1, 1) = 1;
  logits(2, 2) = 1;
  logits(0, 3) = 1;
  logits(2, 5) = 1;  // wrong: target 3
  CHECK(rankwise::exact_match<float>(batch, logits) == 0.5);
  logits(3, 5) = 2;
  CHECK(rankwise::exact_match<float>(batch, logits) == 1.0);
}

TEST_CASE("Tasks: invalid options and names are rejected", "[models][tasks][errors]") {
  CHECK_THROWS_WITH(rankwise::task_kind_from_name("parity"), Catch::Contains("got \"parity\""));
  CHECK_THROWS_WITH(TaskGenerator(TaskKind::Copy, {.seq_len = 10}), Catch::Contains("seq_len must be >= 19"));
  CHECK_THROWS_WITH(TaskGenerator(TaskKind::Copy, {.vocab = 40, .letters = 16}), Catch::Contains("letters must be"));
  CHECK_THROWS_AS(TaskGenerator(TaskKind::Copy, {.min_length = 5, .max_length = 3}), rankwise::InvalidArgument);
  Random rng(0);
  CHECK_THROWS_AS(TaskGenerator(TaskKind::Copy).sample(0, rng), rankwise::InvalidArgument);
}
