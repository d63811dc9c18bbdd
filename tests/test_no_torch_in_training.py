"""torch is a conversion/test dependency only: the training path must not import it."""
import subprocess
import sys

CODE = """
import sys, tempfile
from configs import tiny
from x2vlm_jax import train, metrics, checkpoint, objectives, tasks, cli, inference
from x2vlm_jax.data import pipeline
from x2vlm_jax.evaluate import common
from x2vlm_jax.models import loading
with metrics.MetricWriter(tempfile.mkdtemp()) as writer:
  writer.write_scalars(1, {"loss": 1.0})
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""


def test_training_modules_do_not_import_torch():
  proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120,
                        cwd=__file__.rsplit("/tests/", 1)[0])
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
