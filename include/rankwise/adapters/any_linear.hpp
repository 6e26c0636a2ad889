#pragma once
/// \file rankwise/adapters/any_linear.hpp
/// AnyLinear: a model slot that owns a "linear-like" layer chosen at run time (a Linear, LoRA, DyLoRA,
/// VeRA, RED, MELoRA or any other Layer) behind one small interface, with typed access for whoever
/// created it. adapters/factory.hpp builds one from a name and options.
///
///   Layer       forward, backward, parameters, zero_grad, set_training, in/out_features, set_path
///   lean calls  forward_borrowed (keep a reference to the input, not a copy), backward_parameters_only
///               (no dx); layers without them run forward / backward (into a scratch dx) instead
///   adapter     kind(), trainable_parameter_count(), merge()/unmerge() where the layer can be merged,
///               lora_factors() where the update is exactly a plain LoRA, shared_parameters()
///   typed       get_if<T>() (nullptr when the slot holds something else), as<T>() (throws instead)
/// The layer lives on the heap: moving a slot keeps its parameters at the same address, so optimizers
/// holding Parameter pointers stay valid. Docs: docs/concepts/adapter.md

#include <rankwise/adapters/lora_export.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/layer.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/layers/linear.hpp>

#include <concepts>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace rankwise {

template <FloatScalar Scalar_>
class AnyLinear {
 public:
  using Scalar = Scalar_;
  using MatrixType = Matrix<Scalar>;

  /// A plain Linear slot (kind "linear"), frozen or trainable as given.
  AnyLinear(Linear<Scalar> linear) : AnyLinear("linear", std::move(linear)) {}  // NOLINT: implicit on purpose

  /// Any layer of this scalar type, under the kind name given ("lora", "vera", "my_adapter", ...).
  template <Layer L>
    requires std::same_as<typename L::Scalar, Scalar>
  AnyLinear(std::string kind, L layer) : m_impl(std::make_unique<Model<L>>(std::move(layer))), m_kind(std::move(kind)) {
    if (m_kind.empty()) detail::fail("rankwise::AnyLinear", "kind must be a non-empty name (got \"\")");
  }

  AnyLinear(AnyLinear&&) noexcept = default;
  AnyLinear& operator=(AnyLinear&&) noexcept = default;
  AnyLinear(const AnyLinear&) = delete;
  AnyLinear& operator=(const AnyLinear&) = delete;

  /// The name the slot was created under ("linear", "lora", "dylora", "erat", "vera", "red", "melora").
  const std::string& kind() const { return m_kind; }

  // --- the Layer contract ----------------------------------------------------------------------
  Index in_features() const { return impl().in_features(); }
  Index out_features() const { return impl().out_features(); }
  void forward(const ConstRef<Scalar>& x, MatrixType& y) { impl().forward(x, y); }
  void backward(const ConstRef<Scalar>& dy, MatrixType& dx) { impl().backward(dy, dx); }
  /// forward() that lets the layer keep a reference to x instead of a copy, where the layer supports
  /// it (Linear, LoRA): x must stay alive and unchanged until backward(). Other layers copy as usual.
  void forward_borrowed(const MatrixType& x, MatrixType& y) { impl().forward_borrowed(x, y); }
  void forward_borrowed(const MatrixType&&, MatrixType&) = delete;  // a temporary would dangle
  /// backward() without dx, where the layer supports it (Linear, LoRA); other layers compute dx into
  /// a scratch buffer of the slot.
  void backward_parameters_only(const ConstRef<Scalar>& dy) { impl().backward_parameters_only(dy); }
  std::vector<Parameter<Scalar>*> parameters() { return impl().parameters(); }
  void set_training(bool training) { impl().set_training(training); }
  bool is_training() const { return impl().is_training(); }
  void zero_grad() { impl().zero_grad(); }
  /// Names the parameters after the module path (no-op for layers without set_path()).
  void set_path(const std::string& path) { impl().set_path(path); }

  // --- adapter services --------------------------------------------------------------------------
  /// The trainable scalars of the slot (an adapter's own; a trainable Linear's weight and bias).
  Index trainable_parameter_count() const { return impl().trainable_parameter_count(); }
  /// Frozen tensors shared with other slots (VeRA's bank): count them once in memory reports.
  std::vector<const Parameter<Scalar>*> shared_parameters() const { return impl().shared_parameters(); }

  bool is_mergeable() const { return impl().is_mergeable(); }
  /// Throws StateError for a slot that cannot be merged (a Linear, or a layer without merge()).
  void merge() { impl().merge(m_kind); }
  void unmerge() { impl().unmerge(m_kind); }
  bool is_merged() const { return impl().is_merged(); }

  /// The exact plain-LoRA form of the update, or nothing when there is none (Linear, RED).
  std::optional<LoRAFactors<Scalar>> lora_factors() const { return impl().lora_factors(); }


  // --- typed access --------------------------------------------------------------------------------
  /// The layer as a T, or nullptr when the slot holds another type.
  template <typename T>
  T* get_if() {
    Model<T>* model = dynamic_cast<Model<T>*>(m_impl.get());
    return model ? &model->value : nullptr;
  }
  template <typename T>
  const T* get_if() const {
    const Model<T>* model = dynamic_cast<const Model<T>*>(m_impl.get());
    return model ? &model->value : nullptr;
  }
  /// The layer as a T; throws InvalidArgument when the slot holds another type.
  template <typename T>
  T& as() {
    T* p = get_if<T>();
    if (!p) wrong_type();
    return *p;
  }
  template <typename T>
  const T& as() const {
    const T* p = get_if<T>();
    if (!p) wrong_type();
    return *p;
  }

 private:
  struct Concept {
    virtual ~Concept() = default;
    virtual Index in_features() const = 0;
    virtual Index out_features() const = 0;
    virtual void forward(const ConstRef<Scalar>& x, MatrixType& y) = 0;
    virtual void backward(const ConstRef<Scalar>& dy, MatrixType& dx) = 0;
    virtual void forward_borrowed(const MatrixType& x, MatrixType& y) = 0;
    virtual void backward_parameters_only(const ConstRef<Scalar>& dy) = 0;
    virtual std::vector<Parameter<Scalar>*> parameters() = 0;
    virtual void set_training(bool training) = 0;
    virtual bool is_training() const = 0;
    virtual void zero_grad() = 0;
    virtual void set_path(const std::string& path) = 0;
    virtual Index trainable_parameter_count() const = 0;
    virtual std::vector<const Parameter<Scalar>*> shared_parameters() const = 0;
    virtual bool is_mergeable() const = 0;
    virtual void merge(const std::string& kind) = 0;
    virtual void unmerge(const std::string& kind) = 0;
    virtual bool is_merged() const = 0;
    virtual std::optional<LoRAFactors<Scalar>> lora_factors() const = 0;
  };

  template <typename T>
  struct Model final : Concept {
    explicit Model(T layer) : value(std::move(layer)) {}
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    Index in_features() const override { return value.in_features(); }
    Index out_features() const override { return value.out_features(); }
    void forward(const ConstRef<Scalar>& x, MatrixType& y) override { value.forward(x, y); }
    void backward(const ConstRef<Scalar>& dy, MatrixType& dx) override { value.backward(dy, dx); }
    void forward_borrowed(const MatrixType& x, MatrixType& y) override {
      if constexpr (requires { value.forward_borrowed(x, y); })
        value.forward_borrowed(x, y);
      else
        value.forward(x, y);
    }
    void backward_parameters_only(const ConstRef<Scalar>& dy) override {
      if constexpr (requires { value.backward_parameters_only(dy); })
        value.backward_parameters_only(dy);
      else
        value.backward(dy, scratch_dx);
    }
    std::vector<Parameter<Scalar>*> parameters() override { return value.parameters(); }
    void set_training(bool training) override { value.set_training(training); }
    bool is_training() const override { return value.is_training(); }
    void zero_grad() override { value.zero_grad(); }
    void set_path(const std::string& path) override {
      if constexpr (requires { value.set_path(path); }) value.set_path(path);
    }
    Index trainable_parameter_count() const override {
      if constexpr (requires { value.trainable_parameter_count(); })
        return value.trainable_parameter_count();
      else  // parameters() is not const, but only reads
        return count_trainable(const_cast<T&>(value).parameters());
    }
    std::vector<const Parameter<Scalar>*> shared_parameters() const override {
      if constexpr (requires { value.shared_parameters(); })
        return value.shared_parameters();
      else
        return {};
    }
    bool is_mergeable() const override { return Mergeable<T>; }
    void merge(const std::string& kind) override {
      if constexpr (Mergeable<T>)
        value.merge();
      else
        not_mergeable(kind, "merge");
    }
    void unmerge(const std::string& kind) override {
      if constexpr (Mergeable<T>)
        value.unmerge();
      else
        not_mergeable(kind, "unmerge");
    }
    bool is_merged() const override {
      if constexpr (Mergeable<T>)
        return value.is_merged();
      else
        return false;
    }
    std::optional<LoRAFactors<Scalar>> lora_factors() const override {
      if constexpr (requires { { rankwise::lora_factors(value) } -> std::same_as<LoRAFactors<Scalar>>; })
        return rankwise::lora_factors(value);
      else
        return std::nullopt;
    }

    T value;
    MatrixType scratch_dx;  // dx of backward_parameters_only() for layers without one
  };

  [[noreturn]] static void not_mergeable(const std::string& kind, const char* what) {
    detail::fail<StateError>("rankwise::AnyLinear", what, "(): a \"", kind,
                             "\" slot cannot be merged (it needs merge() and delta_weight())");
  }

  [[noreturn]] void wrong_type() const {
    detail::fail("rankwise::AnyLinear", "as<T>(): the slot holds a \"", m_kind,
                 "\" layer of another type than the one requested; use get_if<T>() to test");
  }

  Concept& impl() {
    if (!m_impl) detail::fail<StateError>("rankwise::AnyLinear", "the slot is empty (it was moved from)");
    return *m_impl;
  }
  const Concept& impl() const {
    if (!m_impl) detail::fail<StateError>("rankwise::AnyLinear", "the slot is empty (it was moved from)");
    return *m_impl;
  }

  std::unique_ptr<Concept> m_impl;
  std::string m_kind;
};

static_assert(Layer<AnyLinear<float>>, "AnyLinear must model the Layer contract");

}  // namespace rankwise
