"""Which optimizer and hyperparameters suit this model? Train K
configurations in lockstep and compare them, in one run.

    from fused_optim import sweep
    configs = sweep.grid({"optimizer": "SGD", "momentum": 0.9}, {"optimizer": "AdamW"},
                         lr=[1e-3, 1e-2, 1e-1])
    result = sweep.run(model, configs, train=(x, y), val=(x_val, y_val), steps=500)
    print(result.leaderboard())
    best = result.best
    optimizer = fused_optim.AdamW(model.parameters(), **best.kwargs)  # (its class: best.config.optimizer)
    model.load_state_dict(best.state_dict)                          # its trained weights

One batched forward and backward for all K (``torch.func.vmap`` over
``functional_call``), one fused optimizer call per optimizer type (each
configuration is a param group whose params are views into the stacked
tensors). ``python -m fused_optim.sweep`` runs an example on scikit-learn's
digits. ``fused_optim.sweep.optuna`` lets Optuna's samplers and pruners
drive the search, over processes and machines.
"""

from fused_optim.sweep.lockstep import Lockstep
from fused_optim.sweep.results import ConfigResult, SweepResult
from fused_optim.sweep.space import (
    OPTIMIZERS,
    Config,
    choice,
    grid,
    loguniform,
    lr_range,
    make_config,
    random_configs,
    uniform,
)
from fused_optim.sweep.trainer import Halving, accuracy, run

__all__ = [
    "OPTIMIZERS", "Config", "ConfigResult", "Halving", "Lockstep", "SweepResult", "accuracy",
    "choice", "grid", "loguniform", "lr_range", "make_config", "random_configs", "run", "uniform",
]
