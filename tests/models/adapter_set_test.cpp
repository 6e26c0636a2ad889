// Tests for rankwise/models/adapter_set.hpp on hosts that are not the toy transformer: a struct of
// slots (the user's own model), a SlotList, and an AdapterSet built by hand.
#include <rankwise/adapters/lora.hpp>
#include <rankwise/adapters/red.hpp>
#include <rankwise/io/peft.hpp>
#include <rankwise/io/safetensors.hpp>
#include <rankwise/models/adapter_set.hpp>
#include <rankwise/rank/allocator.hpp>

#include "support/matchers.hpp"
#include "support/temp_dir.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <vector>

using rankwise::AnyLinear;
using rankwise::Index;
using rankwise::InjectionOptions;
using rankwise::Matrix;
using rankwise::Random;

namespace {

// A user's model: three slots as members, no Scalar member type, no parameters().
struct TwoLayer {
  AnyLinear<double> first, second, out;
  TwoLayer(Random& rng)
      : first(rankwise::Linear<double>(6, 5, rng)), second(rankwise::Linear<double>(5, 5, rng)),
        out(rankwise::Linear<double>(5, 3, rng)) {}
  void for_each_slot(const std::function<void(const std::string&, AnyLinear<double>&)>& f) {
    f("body.first", first);
    f("body.second", second);
    f("out", out);
  }
  Matrix<double> forward(const Matrix<double>& x) {
    Matrix<double> a, b, c;
    first.forward(x, a);
    second.forward(a, b);
    out.forward(b, c);
    return c;
  }
};

InjectionOptions lora_all(Index rank) {
  InjectionOptions o;
  o.adapter = {"lora", rankwise::LoRAOptions{.rank = rank, .alpha = 2.0 * double(rank)}};
  o.all_linear = true;
  return o;
}

}  // namespace

TEST_CASE("inject: a struct of slots is a host, its parameters named after the paths", "[models][adapter_set]") {
  Random rng(3);
  TwoLayer model(rng);
  Matrix<double> x(6, 4);
  rankwise::fill_normal(x, 0.0, 1.0, rng);
  const Matrix<double> before = model.forward(x);

  const double* weights = model.first.as<rankwise::Linear<double>>().weight().data();
  rankwise::AdapterSet<double> adapters = rankwise::inject<double>(model, lora_all(2), rng);
  REQUIRE(adapters.size() == 3);
  // The module's weights were moved into the adapter, not copied.
  CHECK(model.first.as<rankwise::LoRA<double>>().base().weight().data() == weights);
  CHECK(adapters.paths() == std::vector<std::string>{"body.first", "body.second", "out"});
  CHECK(model.first.kind() == "lora");
  // B = 0 at injection: the function is unchanged.
  CHECK_THAT(model.forward(x), rankwise::test_support::is_close_to(before, 0.0, 0.0));

  const std::vector<rankwise::Parameter<double>*> params = adapters.parameters();
  REQUIRE(params.size() == 6);  // A and B of each module; the bases are frozen
  std::set<std::string> names;
  for (const rankwise::Parameter<double>* p : params) {
    CHECK(p->trainable);
    names.insert(p->name);
  }
  CHECK(names.size() == params.size());
  CHECK(names.count("body.first.lora_A.weight") == 1);
  CHECK(names.count("out.lora_B.weight") == 1);

  const rankwise::ParameterSummary s = adapters.summary(model);
  CHECK(s.trainable == 2 * (6 + 5) + 2 * (5 + 5) + 2 * (5 + 3));
  CHECK(s.total == s.trainable + (6 * 5 + 5) + (5 * 5 + 5) + (5 * 3 + 3));
}

TEST_CASE("AdapterSet: rank modules drive an allocator, named adapters save, merge folds every module",
          "[models][adapter_set]") {
  Random rng(4);
  AnyLinear<float> a(rankwise::Linear<float>(8, 6, rng)), b(rankwise::Linear<float>(6, 4, rng));
  rankwise::SlotList<float> host;
  host.add("enc.a", a).add("enc.b", b);
  rankwise::AdapterSet<float> adapters = rankwise::inject(host, lora_all(3), rng);
  for (rankwise::Parameter<float>* p : adapters.parameters())
    if (p->name.find("lora_B") != std::string::npos) rankwise::fill_normal(p->value, 0.0, 0.1, rng);

  std::vector<rankwise::RankModule<float>> modules = adapters.rank_modules();
  REQUIRE(modules.size() == 2);
  CHECK(modules[0].path() == "enc.a");
  CHECK(modules[1].rank() == 3);

  rankwise::test_support::TempDir dir("adapter_set");
  const rankwise::PeftConfig config = rankwise::save_peft_adapter(dir.path / "peft", adapters.named_adapters());
  CHECK(config.r == 3);
  const auto file = rankwise::read_peft_lora<float>(dir.path / "peft");
  REQUIRE(file.modules.size() == 2);
  CHECK(file.modules[1].path == "enc.b");

  Matrix<float> x(8, 5), y_adapted, y_merged;
  rankwise::fill_normal(x, 0.0, 1.0, rng);
  adapters.set_training(false);
  a.forward(x, y_adapted);
  adapters.merge();
  CHECK(adapters.is_merged());
  a.forward(x, y_merged);
  CHECK_THAT(y_merged, rankwise::test_support::is_close_to(y_adapted, 1e-5, 1e-5));
  CHECK_THROWS_WITH(adapters.merge(), Catch::Contains("'enc.a' is merged already; nothing was merged"));
  adapters.unmerge();
  CHECK_FALSE(a.is_merged());
  CHECK_FALSE(b.is_merged());
  CHECK_THROWS_WITH(adapters.unmerge(), Catch::Contains("'enc.a' is not merged; nothing was unmerged"));
}

TEST_CASE("inject and AdapterSet: bad hosts and requests are refused, the host unchanged", "[models][adapter_set][errors]") {
  Random rng(5);
  AnyLinear<float> a(rankwise::Linear<float>(4, 4, rng)), b(rankwise::Linear<float>(4, 2, rng));

  rankwise::SlotList<float> list;
  list.add("a", a);
  CHECK_THROWS_WITH(list.add("a", b), Catch::Contains("path 'a' is listed twice"));
  CHECK_THROWS_WITH(list.add("b", a), Catch::Contains("slot 'b' is already listed as 'a'"));
  CHECK_THROWS_WITH(list.add("", b), Catch::Contains("non-empty path"));

  struct Twice {
    using Scalar = float;
    AnyLinear<float>* slot;
    void for_each_slot(const std::function<void(const std::string&, AnyLinear<float>&)>& f) {
      f("same", *slot);
      f("same", *slot);
    }
  } twice{&a};
  CHECK_THROWS_WITH(rankwise::inject(twice, lora_all(1), rng), Catch::Contains("lists the path 'same' twice"));

  list.add("b", b);
  InjectionOptions too_big = lora_all(4);  // b is 4 -> 2: rank 4 > min(4, 2)
  const Matrix<float> a_weight = a.as<rankwise::Linear<float>>().weight();
  const Random stream = rng;
  CHECK_THROWS_WITH(rankwise::inject(list, too_big, rng), Catch::Contains("module 'b'"));
  CHECK(a.kind() == "linear");  // nothing changed, a included
  CHECK(rankwise::test_support::same_bits(a.as<rankwise::Linear<float>>().weight(), a_weight));
  CHECK(b.as<rankwise::Linear<float>>().in_features() == 4);
  CHECK(rng == stream);  // nor the caller's stream
  InjectionOptions none = lora_all(1);
  none.all_linear = false;
  none.target_modules = {"q_proj"};
  CHECK_THROWS_WITH(rankwise::inject(list, none, rng), Catch::Contains("the module paths are: a, b"));

  InjectionOptions red;
  red.adapter = {"red", rankwise::REDOptions{}};
  red.all_linear = true;
  rankwise::AdapterSet<float> edits = rankwise::inject(list, red, rng);
  CHECK_THROWS_WITH(edits.rank_modules(), Catch::Contains("'a' holds a \"red\" adapter, whose rank cannot change"));
  CHECK_THROWS_WITH(edits.slot("c"), Catch::Contains("the adapted paths are: a, b"));
  CHECK_THROWS_WITH(rankwise::inject(list, lora_all(1), rng), Catch::Contains("already holds a \"red\" adapter"));

  CHECK_THROWS_WITH((rankwise::AdapterSet<float>({{"x", &a}, {"x", &b}})), Catch::Contains("'x' is listed twice"));
  CHECK_THROWS_WITH((rankwise::AdapterSet<float>({{"x", nullptr}})), Catch::Contains("null slot"));
}

TEST_CASE("AdapterSet::assign_values: values by name, all or nothing, also from a safetensors file",
          "[models][adapter_set]") {
  Random rng(5);
  TwoLayer model(rng);
  rankwise::AdapterSet<double> adapters = rankwise::inject<double>(model, lora_all(2), rng);
  const rankwise::LoRA<double>& first = model.first.as<rankwise::LoRA<double>>();
  Matrix<double> b(5, 2), a(2, 6);
  rankwise::fill_normal(b, 0.0, 1.0, rng);
  rankwise::fill_normal(a, 0.0, 1.0, rng);
  adapters.assign_values({{"body.first.lora_B.weight", b}, {"body.first.lora_A.weight", a}});
  CHECK(first.B() == b);
  CHECK(first.A() == a);
  // The forward pass uses them: W x + s B A x.
  Matrix<double> x(6, 3), y;
  rankwise::fill_normal(x, 0.0, 1.0, rng);
  model.first.forward(x, y);
  Matrix<double> expected = first.base().weight() * x + first.scale() * b * (a * x);
  expected.colwise() += first.base().bias().col(0);
  CHECK_THAT(y, rankwise::test_support::is_close_to(expected, 1e-12, 1e-12));

  // Refusals name the parameter, and change nothing (the good entry next to the bad one included).
  const Matrix<double> zeros = Matrix<double>::Zero(5, 2);
  CHECK_THROWS_WITH(adapters.assign_values({{"body.first.lora_B.weight", zeros}, {"body.frist.lora_A.weight", a}}),
                    Catch::Contains("no parameter is named 'body.frist.lora_A.weight'"));
  CHECK_THROWS_WITH(adapters.assign_values({{"body.first.lora_B.weight", zeros}, {"out.lora_A.weight", a}}),
                    Catch::Contains("'out.lora_A.weight' is 2 x 5 but the value given is 2 x 6"));
  Matrix<double> nan = a;
  nan(1, 1) = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(adapters.assign_values({{"body.first.lora_B.weight", zeros}, {"body.first.lora_A.weight", nan}}),
                    Catch::Contains("'body.first.lora_A.weight' is not finite everywhere"));
  CHECK_THROWS_WITH(adapters.assign_values({{"body.first.lora_B.weight", zeros}}, {.require_all = true}),
                    Catch::Contains("no value is given for"));
  CHECK(first.B() == b);
  CHECK(first.A() == a);
  adapters.assign_values({{"body.first.lora_A.weight", nan}}, {.allow_non_finite = true});
  CHECK(std::isnan(first.A()(1, 1)));
  adapters.assign_values({{"body.first.lora_A.weight", a}});

  // From a file in the library's layout: tensors named like the parameters, [n] vectors as n x 1.
  const rankwise::test_support::TempDir dir("assign_values");
  {
    rankwise::SafetensorsWriter out(rankwise::DType::F64);
    out.add("out.lora_B.weight", Matrix<double>(b.topRows(3)));
    out.add_vector("body.first.base_layer.bias", Matrix<double>(Matrix<double>::Constant(5, 1, 0.5)));
    out.write(dir.path / "values.safetensors");
  }
  // [snippet: assign-from-file]
  rankwise::SafetensorsReader file(dir.path / "values.safetensors");
  std::map<std::string, Matrix<double>> values;
  for (const rankwise::TensorInfo& t : file.tensors()) values[t.name] = file.matrix<double>(t.name);
  adapters.assign_values(values);
  // [snippet: assign-from-file]
  CHECK(model.out.as<rankwise::LoRA<double>>().B() == b.topRows(3));
  CHECK(first.base().bias() == Matrix<double>::Constant(5, 1, 0.5));

  // Merged adapters refuse: their bases already hold s B A.
  adapters.merge();
  CHECK_THROWS_AS(adapters.assign_values({{"body.first.lora_A.weight", a}}), rankwise::StateError);
  adapters.unmerge();
}
