#pragma once
/// \file rankwise/models/toy_transformer.hpp
/// ToyTransformer: a small decoder-only transformer in Eigen with a full manual backward, whose six
/// linear projections per block (and the lm_head) are slots that can hold any adapter.
///
///   x_0 = E_tok[ids] + E_pos[t]
///   block i (pre-LayerNorm):
///     h   = x + o_proj(attention(q_proj(n), k_proj(n), v_proj(n))),   n = attn_norm(x)
///     x'  = h + down_proj(gelu(up_proj(mlp_norm(h))))
///   logits = lm_head(norm(x_L))                                      (lm_head untied from E_tok)
///   shapes  tokens are columns: x is d_model x (batch * seq_len), the tokens of one sequence consecutive
///   paths   layers.{i}.attn.{q,k,v,o}_proj, layers.{i}.mlp.{up,down}_proj, lm_head (Hugging Face habits);
///           other tensors: embed_tokens, embed_positions, layers.{i}.attn_norm, layers.{i}.mlp_norm, norm
///   init    Linear: U(+-1/sqrt(in)) (PyTorch); embeddings N(0, 0.02^2) (GPT-2); LayerNorm 1 and 0
/// Buffers live in the model and are reused, so a training step allocates nothing after the first one
/// with the same batch shape. Memory: each block keeps the activations its backward needs once (the
/// slots, the attention core and GELU borrow the block's buffers instead of copying their inputs);
/// buffers needed only inside one block's forward or backward are shared by all blocks. When the
/// embeddings are frozen, the first block's backward skips the input gradient nobody needs.
/// Docs: docs/models/toy-transformer.md

#include <rankwise/adapters/any_linear.hpp>
#include <rankwise/core/error.hpp>
#include <rankwise/core/parameter.hpp>
#include <rankwise/core/random.hpp>
#include <rankwise/core/types.hpp>
#include <rankwise/layers/causal_attention.hpp>
#include <rankwise/layers/embedding.hpp>
#include <rankwise/layers/gelu.hpp>
#include <rankwise/layers/layer_norm.hpp>
#include <rankwise/layers/linear.hpp>

#include <array>
#include <cstdint>
#include <functional>
#include <iterator>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace rankwise {

struct ToyTransformerConfig {
  Index vocab = 128;
  Index d_model = 128;
  Index heads = 4;
  Index layers = 4;
  Index d_ff = 512;
  Index max_seq_len = 64;

  friend bool operator==(const ToyTransformerConfig&, const ToyTransformerConfig&) = default;
};

template <FloatScalar Scalar_>
class ToyTransformer {
 public:
  using Scalar = Scalar_;
  using MatrixType = Matrix<Scalar>;
  using Slot = AnyLinear<Scalar>;

  ToyTransformer(const ToyTransformerConfig& config, Random& rng)
      : m_config(checked(config)),
        m_embed_tokens(config.vocab, config.d_model, rng, 0.02),
        m_embed_positions(config.max_seq_len, config.d_model, rng, 0.02),
        m_norm(config.d_model),
        m_lm_head(Linear<Scalar>(config.d_model, config.vocab, rng, {.bias = false})) {
    m_blocks.reserve(std::size_t(config.layers));
    for (Index i = 0; i < config.layers; ++i) m_blocks.emplace_back(config, rng);
    name_parameters();
  }

  ToyTransformer(ToyTransformer&&) noexcept = default;
  ToyTransformer& operator=(ToyTransformer&&) noexcept = default;

  const ToyTransformerConfig& config() const { return m_config; }

  // --- modules ------------------------------------------------------------------------------------
  /// Paths of every linear slot, in model order: layers.{i}.attn.{q,k,v,o}_proj,
  /// layers.{i}.mlp.{up,down}_proj, ..., lm_head.
  std::vector<std::string> linear_paths() const {
    std::vector<std::string> paths;
    for (Index i = 0; i < m_config.layers; ++i)
      for (const char* leaf : {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up_proj",
                               "mlp.down_proj"})
        paths.push_back("layers." + std::to_string(i) + "." + leaf);
    paths.push_back("lm_head");
    return paths;
  }

  /// The slot at `path`; InvalidArgument listing the valid paths otherwise.
  Slot& linear(const std::string& path) {
    if (Slot* slot = find_slot(path)) return *slot;
    std::string known;
    for (const std::string& p : linear_paths()) known += (known.empty() ? "" : ", ") + p;
    detail::fail("rankwise::ToyTransformer", "no linear module at path '", path, "'; the paths are: ", known);
  }

  /// Replaces the slot at `path` (e.g. with an adapter built around its current layer), naming its
  /// parameters after the path.
  void replace_linear(const std::string& path, Slot slot) {
    Slot& target = linear(path);
    if (slot.in_features() != target.in_features() || slot.out_features() != target.out_features())
      detail::fail("rankwise::ToyTransformer", "replacement for '", path, "' must be ", target.out_features(), " x ",
                   target.in_features(), " (got ", slot.out_features(), " x ", slot.in_features(), ")");
    slot.set_path(path);
    slot.set_training(m_training);
    target = std::move(slot);
  }

  // --- training API ---------------------------------------------------------------------------------
  /// logits (vocab x n) for tokens (n = batch * seq_len, sequences of seq_len consecutive tokens).
  void forward(std::span<const std::int32_t> tokens, Index seq_len, MatrixType& logits) {
    if (seq_len < 1 || seq_len > m_config.max_seq_len)
      detail::fail("rankwise::ToyTransformer", "seq_len must be in [1, max_seq_len] = [1, ", m_config.max_seq_len,
                   "] (got ", seq_len, ")");
    if (tokens.empty() || Index(tokens.size()) % seq_len != 0)
      detail::fail("rankwise::ToyTransformer", "the number of tokens must be a positive multiple of seq_len = ",
                   seq_len, " (got ", tokens.size(), ")");
    const Index n = Index(tokens.size());
    m_positions.resize(tokens.size());
    for (Index t = 0; t < n; ++t) m_positions[std::size_t(t)] = std::int32_t(t % seq_len);
    m_embed_tokens.forward(tokens, m_x);  // checks every id against the vocabulary
    m_embed_positions.forward(m_positions, m_pos);
    m_x += m_pos;
    for (Block& block : m_blocks) block.forward(m_x, seq_len, m_scratch);
    m_norm.forward(m_x, m_normed);
    m_lm_head.forward(m_normed, logits);
  }

  /// Back-propagates dL/dlogits of the last training forward; accumulates every trainable gradient.
  void backward(const ConstRef<Scalar>& dlogits) {
    m_lm_head.backward(dlogits, m_d_normed);
    m_norm.backward(m_d_normed, m_dx);
    // dL/d(input of the first block) feeds only the embeddings: not needed when they are frozen.
    const bool embeddings_learn = m_embed_tokens.weight().trainable || m_embed_positions.weight().trainable;
    for (auto it = m_blocks.rbegin(); it != m_blocks.rend(); ++it)
      it->backward(m_dx, m_scratch, embeddings_learn || std::next(it) != m_blocks.rend());
    m_embed_tokens.backward(m_dx);
    m_embed_positions.backward(m_dx);
  }

  /// Every tensor of the model (frozen ones flagged), named by path.
  std::vector<Parameter<Scalar>*> parameters() {
    std::vector<Parameter<Scalar>*> params;
    const auto add = [&](std::vector<Parameter<Scalar>*> more) { params.insert(params.end(), more.begin(), more.end()); };
    add(m_embed_tokens.parameters());
    add(m_embed_positions.parameters());
    for (Block& block : m_blocks) add(block.parameters());
    add(m_norm.parameters());
    add(m_lm_head.parameters());
    return params;
  }

  /// Copies the values of every tensor of `other` into this model (a teacher or a fresh run built from
  /// a base). Both must have the same configuration and hold the same tensors by name (adapt neither,
  /// or both alike); otherwise InvalidArgument and nothing changes.
  void copy_parameters_from(ToyTransformer& other) {
    if (!(other.config() == config()))
      detail::fail("rankwise::ToyTransformer", "copy_parameters_from: the models must have the same configuration");
    const std::vector<Parameter<Scalar>*> from = other.parameters(), to = parameters();
    bool same = from.size() == to.size();
    for (std::size_t i = 0; same && i < from.size(); ++i)
      same = from[i]->name == to[i]->name && from[i]->value.rows() == to[i]->value.rows() &&
             from[i]->value.cols() == to[i]->value.cols();
    if (!same)
      detail::fail("rankwise::ToyTransformer", "copy_parameters_from: the models must hold the same tensors (got ",
                   from.size(), " and ", to.size(), " tensors, or names or shapes that differ)");
    for (std::size_t i = 0; i < from.size(); ++i) to[i]->value = from[i]->value;
  }

  /// Zeroes every gradient (without building a parameter list: a steady-state step allocates nothing).
  void zero_grad() {
    m_embed_tokens.zero_grad();
    m_embed_positions.zero_grad();
    for (Block& block : m_blocks) block.zero_grad();
    m_norm.zero_grad();
    m_lm_head.zero_grad();
  }

  void set_training(bool training) {
    m_training = training;
    m_embed_tokens.set_training(training);
    m_embed_positions.set_training(training);
    for (Block& block : m_blocks) block.set_training(training);
    m_norm.set_training(training);
    m_lm_head.set_training(training);
  }
  bool is_training() const { return m_training; }

  /// Freezes (or unfreezes) the embeddings, norms and the plain Linear slots. Adapters keep their own
  /// trainable flags (their bases stay frozen).
  void set_base_trainable(bool trainable) {
    m_embed_tokens.set_trainable(trainable);
    m_embed_positions.set_trainable(trainable);
    m_norm.set_trainable(trainable);
    for_each_slot([&](const std::string&, Slot& slot) {
      if (Linear<Scalar>* linear = slot.template get_if<Linear<Scalar>>()) linear->set_trainable(trainable);
    });
    for (Block& block : m_blocks) block.set_norms_trainable(trainable);
  }

  /// Calls f(path, slot) for every linear slot in model order.
  void for_each_slot(const std::function<void(const std::string&, Slot&)>& f) {
    const std::vector<std::string> paths = linear_paths();
    for (const std::string& path : paths) f(path, *find_slot(path));
  }

 private:
  // Buffers used only inside one block's forward or backward, shared by all blocks.
  struct Scratch {
    MatrixType o, u;                                // forward: projection outputs
    MatrixType dg, du, dn, dtmp, da, dq, dk, dv;    // backward: gradients between the pieces
  };

  struct Block {
    Block(const ToyTransformerConfig& c, Random& rng)
        : attn_norm(c.d_model),
          q_proj(Linear<Scalar>(c.d_model, c.d_model, rng)),
          k_proj(Linear<Scalar>(c.d_model, c.d_model, rng)),
          v_proj(Linear<Scalar>(c.d_model, c.d_model, rng)),
          o_proj(Linear<Scalar>(c.d_model, c.d_model, rng)),
          attention(c.d_model, c.heads),
          mlp_norm(c.d_model),
          up_proj(Linear<Scalar>(c.d_model, c.d_ff, rng)),
          gelu(c.d_ff),
          down_proj(Linear<Scalar>(c.d_ff, c.d_model, rng)) {}

    // x is updated in place: x <- block(x). The slots and the attention core borrow n1, q, k, v, a, n2
    // and g (kept until backward); the projection outputs o and u are scratch.
    void forward(MatrixType& x, Index seq_len, Scratch& s) {
      attn_norm.forward(x, n1);
      q_proj.forward_borrowed(n1, q);
      k_proj.forward_borrowed(n1, k);
      v_proj.forward_borrowed(n1, v);
      attention.forward_borrowed(q, k, v, seq_len, a);
      o_proj.forward_borrowed(a, s.o);
      x += s.o;  // h
      mlp_norm.forward(x, n2);
      up_proj.forward_borrowed(n2, s.u);
      gelu.forward(s.u, g);  // GELU keeps its derivative, not u
      down_proj.forward_borrowed(g, s.o);
      x += s.o;
    }

    // dx: dL/d(block output) in, dL/d(block input) out. Without input_grad (the first block under
    // frozen embeddings) and with a frozen attn_norm, the q/k/v input gradients and attn_norm's
    // backward are skipped and dx is left at dL/dh.
    void backward(MatrixType& dx, Scratch& s, bool input_grad) {
      down_proj.backward(dx, s.dg);
      gelu.backward(s.dg, s.du);
      up_proj.backward(s.du, s.dn);
      mlp_norm.backward(s.dn, s.dtmp);
      dx += s.dtmp;  // dL/dh
      o_proj.backward(dx, s.da);
      attention.backward(s.da, s.dq, s.dk, s.dv);
      if (!input_grad && !attn_norm.gamma().trainable && !attn_norm.beta().trainable) {
        q_proj.backward_parameters_only(s.dq);
        k_proj.backward_parameters_only(s.dk);
        v_proj.backward_parameters_only(s.dv);
        return;
      }
      q_proj.backward(s.dq, s.dn);
      k_proj.backward(s.dk, s.dtmp);
      s.dn += s.dtmp;
      v_proj.backward(s.dv, s.dtmp);
      s.dn += s.dtmp;
      attn_norm.backward(s.dn, s.dtmp);
      dx += s.dtmp;
    }

    std::vector<Parameter<Scalar>*> parameters() {
      std::vector<Parameter<Scalar>*> params;
      const auto add = [&](std::vector<Parameter<Scalar>*> more) { params.insert(params.end(), more.begin(), more.end()); };
      add(attn_norm.parameters());
      add(q_proj.parameters());
      add(k_proj.parameters());
      add(v_proj.parameters());
      add(o_proj.parameters());
      add(mlp_norm.parameters());
      add(up_proj.parameters());
      add(down_proj.parameters());
      return params;
    }

    void set_training(bool training) {
      for (Slot* s : slots()) s->set_training(training);
      attn_norm.set_training(training);
      mlp_norm.set_training(training);
      attention.set_training(training);
      gelu.set_training(training);
    }

    void zero_grad() {
      for (Slot* s : slots()) s->zero_grad();
      attn_norm.zero_grad();
      mlp_norm.zero_grad();
    }

    void set_norms_trainable(bool trainable) {
      attn_norm.set_trainable(trainable);
      mlp_norm.set_trainable(trainable);
    }

    std::array<Slot*, 6> slots() { return {&q_proj, &k_proj, &v_proj, &o_proj, &up_proj, &down_proj}; }

    LayerNorm<Scalar> attn_norm;
    Slot q_proj, k_proj, v_proj, o_proj;
    CausalSelfAttention<Scalar> attention;
    LayerNorm<Scalar> mlp_norm;
    Slot up_proj;
    GELU<Scalar> gelu;
    Slot down_proj;
    // Activations kept from forward to backward, reused across steps.
    MatrixType n1, q, k, v, a, n2, g;
  };

  static const ToyTransformerConfig& checked(const ToyTransformerConfig& c) {
    if (c.vocab < 1 || c.d_model < 1 || c.heads < 1 || c.layers < 1 || c.d_ff < 1 || c.max_seq_len < 1)
      detail::fail("rankwise::ToyTransformer", "every size must be >= 1 (got vocab ", c.vocab, ", d_model ", c.d_model,
                   ", heads ", c.heads, ", layers ", c.layers, ", d_ff ", c.d_ff, ", max_seq_len ", c.max_seq_len, ")");
    if (c.d_model % c.heads != 0)
      detail::fail("rankwise::ToyTransformer", "d_model must be a multiple of heads (got d_model ", c.d_model,
                   ", heads ", c.heads, ")");
    return c;
  }

  Slot* find_slot(const std::string& path) {
    if (path == "lm_head") return &m_lm_head;
    const std::string prefix = "layers.";
    if (path.rfind(prefix, 0) != 0) return nullptr;
    const std::size_t dot = path.find('.', prefix.size());
    if (dot == std::string::npos) return nullptr;
    const std::string number = path.substr(prefix.size(), dot - prefix.size());
    if (number.empty() || number.find_first_not_of("0123456789") != std::string::npos || number.size() > 6)
      return nullptr;
    const Index i = std::stol(number);
    if (i >= m_config.layers) return nullptr;
    Block& b = m_blocks[std::size_t(i)];
    const std::string leaf = path.substr(dot + 1);
    if (leaf == "attn.q_proj") return &b.q_proj;
    if (leaf == "attn.k_proj") return &b.k_proj;
    if (leaf == "attn.v_proj") return &b.v_proj;
    if (leaf == "attn.o_proj") return &b.o_proj;
    if (leaf == "mlp.up_proj") return &b.up_proj;
    if (leaf == "mlp.down_proj") return &b.down_proj;
    return nullptr;
  }

  void name_parameters() {
    m_embed_tokens.set_path("embed_tokens");
    m_embed_positions.set_path("embed_positions");
    m_norm.set_path("norm");
    for (Index i = 0; i < m_config.layers; ++i) {
      Block& b = m_blocks[std::size_t(i)];
      const std::string base = "layers." + std::to_string(i) + ".";
      b.attn_norm.set_path(base + "attn_norm");
      b.mlp_norm.set_path(base + "mlp_norm");
    }
    for_each_slot([](const std::string& path, Slot& slot) { slot.set_path(path); });
  }

  ToyTransformerConfig m_config;
  Embedding<Scalar> m_embed_tokens;
  Embedding<Scalar> m_embed_positions;
  std::vector<Block> m_blocks;
  LayerNorm<Scalar> m_norm;
  Slot m_lm_head;
  bool m_training = true;
  std::vector<std::int32_t> m_positions;
  MatrixType m_x, m_pos, m_normed, m_d_normed, m_dx;
  Scratch m_scratch;
};

}  // namespace rankwise
