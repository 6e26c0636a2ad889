// A downstream program that found rankwise with find_package(): wraps a layer and runs it once.
#include <rankwise/rankwise.hpp>

#include <iostream>

int main() {
  rankwise::Random rng(1);
  rankwise::LoRA<float> lora(rankwise::Linear<float>(8, 4, rng), rankwise::LoRAOptions{.rank = 2, .alpha = 4.0}, rng);
  const rankwise::Matrix<float> x = rankwise::Matrix<float>::Ones(8, 3);
  rankwise::Matrix<float> y;
  lora.forward(x, y);
  std::cout << "rankwise " << rankwise::version_string << ": y is " << y.rows() << " x " << y.cols() << "\n";
  return (y.rows() == 4 && y.cols() == 3) ? 0 : 1;
}
