"""`import jaxtrain` needs only jax, flax, optax, orbax and numpy (the GPU image has no TFDS)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BLOCKER = """
import sys
BLOCKED = {"tensorflow_datasets", "tensorflow", "sklearn", "matplotlib", "tqdm", "tensorboardX",
           "torch", "wandb", "mlflow"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked for this test: {name}")
sys.meta_path.insert(0, Block())
import jaxtrain
from jaxtrain import train_step, eval_step, create_train_state, TrainState
import jaxtrain.loop, jaxtrain.seeds, jaxtrain.checkpoint, jaxtrain.parallel
import jaxtrain.robustness
print("imported", sorted(m for m in BLOCKED if m in sys.modules))
"""


def test_import_without_optional_packages():
    out = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, check=False,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "imported []" in out.stdout
