// launch_capacities() (launch_capacity.h): every op of FO_FOR_EACH_OP, every
// combination of its mode keywords and optional state lists that its spec
// accepts, one row per distinct set of state lists.
#include "launch_capacity.h"

#include <algorithm>

#include "cuda/multi_tensor_plan.h"
#include "fused_optim/op_specs.h"

namespace fused_optim {
namespace {

// Whether state list k is given under `modes` (StateList::used), with the
// optional ones (kIfGiven) set by the bits of `given`.
template <typename Spec>
CallModes call_modes(unsigned mode_bits, unsigned given_bits) {
  CallModes m;
  for (size_t k = 0; k < ModeCount<Spec>::value; ++k) m.mode[k] = (mode_bits >> k) & 1u;
  for (size_t k = 0; k < count_of(Spec::kState); ++k) {
    const int used = Spec::kState[k].used;
    m.has_state[k] = used == StateList::kAlways ||
                     (used == StateList::kIfGiven ? ((given_bits >> k) & 1u) != 0
                                                  : m.mode[used]);
  }
  return m;
}

template <typename Spec>
void add_rows(std::vector<LaunchCapacity>& rows) {
  using Hyper = typename Spec::Hyper;
  const size_t first = rows.size();
  const unsigned modes = 1u << ModeCount<Spec>::value;
  const unsigned given = 1u << count_of(Spec::kState);
  for (unsigned mode_bits = 0; mode_bits < modes; ++mode_bits) {
    for (unsigned given_bits = 0; given_bits < given; ++given_bits) {
      const CallModes m = call_modes<Spec>(mode_bits, given_bits);
      if (Spec::mode_error(m) != nullptr) continue;  // (e.g. nesterov without momentum)
      LaunchCapacity row = Spec::with_element_op(m, [](auto op) {
        using Meta = cuda::TensorListMeta<decltype(op)::kNumOperands, Hyper>;
        return LaunchCapacity{Spec::kName, {}, decltype(op)::kNumOperands, sizeof(Hyper),
                              Meta::kMaxSlots, Meta::kMaxTensors, sizeof(Meta)};
      });
      for (size_t k = 0; k < count_of(Spec::kState); ++k) {
        if (m.has_state[k]) row.state_lists.push_back(Spec::kState[k].name);
      }
      const bool seen = std::any_of(rows.begin() + first, rows.end(), [&](const auto& r) {
        return r.state_lists == row.state_lists;
      });
      if (!seen) rows.push_back(std::move(row));
    }
  }
  std::stable_sort(rows.begin() + first, rows.end(),
            [](const auto& a, const auto& b) { return a.operands < b.operands; });
}

}  // namespace

std::vector<LaunchCapacity> launch_capacities() {
  std::vector<LaunchCapacity> rows;
#define FO_ADD_ROWS(Spec) add_rows<Spec>(rows);
  FO_FOR_EACH_OP(FO_ADD_ROWS)
#undef FO_ADD_ROWS
  return rows;
}

}  // namespace fused_optim
