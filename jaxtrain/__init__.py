"""jaxtrain: a functional JAX training stack.

Pure data transforms, Flax models, one Optax train step that runs jitted,
pmapped, sharded over a mesh or vmapped over seeds, Orbax checkpoints and a
robustness suite. Heavy optional packages (TFDS, matplotlib) load lazily.
"""

from jaxtrain.config import ConfigError, TrainConfig
from jaxtrain.data import Dataset, load_dataset
from jaxtrain.models import MODELS, create_model
from jaxtrain.optim import create_optimizer, create_schedule
from jaxtrain.parallel import Strategy, create_strategy
from jaxtrain.state import TrainState, create_train_state
from jaxtrain.steps import cross_entropy, eval_step, train_step

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Dataset",
    "MODELS",
    "Strategy",
    "TrainConfig",
    "TrainState",
    "create_model",
    "create_optimizer",
    "create_schedule",
    "create_strategy",
    "create_train_state",
    "cross_entropy",
    "eval_step",
    "load_dataset",
    "train_and_evaluate",
    "train_step",
]


def __getattr__(name: str):
    # The loop pulls in Orbax and the writers; import it only when asked for.
    if name == "train_and_evaluate":
        from jaxtrain.loop import train_and_evaluate

        return train_and_evaluate
    raise AttributeError(f"module 'jaxtrain' has no attribute {name!r}")
